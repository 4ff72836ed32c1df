"""The core: numpy only. The search, text handling, settings, requests and results, the
reward-model manifest and the pure parts of its cache contract. Nothing here imports
llama.cpp, onnxruntime, tokenizers, torch or click: the layers above bring those."""
