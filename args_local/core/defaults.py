"""The defaults of each kind of request, and the environment variables of the model options, in one place.

``args-local generate`` and the Python API's ``generate``/``stream`` start from
:data:`GENERATE`; ``args-local chat``, the API's ``chat`` and the ``llm`` plugin start from
:data:`CHAT`. Changing a default here changes it for every front end at once.
"""

from __future__ import annotations

from .settings import Settings

# ARGS-stochastic at the reference's temperature 0.7, with llama.cpp's classic repeat penalty
# of 1.1 over the last 64 tokens: chosen with `args-local eval` (README, "Defaults"). The
# paper's ARGS-greedy (Settings(), --paper) looped in 40% of 160-token replies to everyday
# prompts; with the penalty, greedy still looped in 30% of 512-token chat replies (repeats
# longer than the window), this in none of 60 replies on two prompt sets, and it kept its gain
# in reward and in a held-out sentiment judge over the same decoding at w = 0.
GENERATE = Settings(mode="sample", temperature=0.7, repeat_penalty=1.1, repeat_last_n=64)
CHAT = GENERATE.update(max_tokens=512)  # a conversation's replies may run longer than a one-off answer

# Environment variables for the model options users set once: the CLI's -m, -r, -t,
# --policy-url and --policy-api-key, and the llm plugin's models, read them.
ENV_VARS = {"model": "ARGS_LOCAL_MODEL", "reward_model": "ARGS_LOCAL_REWARD_MODEL", "threads": "ARGS_LOCAL_THREADS",
            "policy_url": "ARGS_LOCAL_POLICY_URL", "policy_api_key": "ARGS_LOCAL_POLICY_API_KEY"}
