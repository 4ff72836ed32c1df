"""The runtime: the policy under llama.cpp (:mod:`.policy`, the only importer of llama_cpp),
the reward model under onnxruntime and its caches (:mod:`.reward`, :mod:`.caches`, the only
importers of onnxruntime), and the engine that joins them (:mod:`.engine`)."""
