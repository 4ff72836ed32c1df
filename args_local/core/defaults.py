"""The defaults of each kind of request, and the environment variables of the model options, in one place.

``args-local generate`` and the Python API's ``generate``/``stream`` start from
:data:`GENERATE`; ``args-local chat``, the API's ``chat`` and the ``llm`` plugin start from
:data:`CHAT`. Changing a default here changes it for every front end at once.
"""

from __future__ import annotations

from .settings import Settings

GENERATE = Settings()
CHAT = Settings(max_tokens=512)  # a conversation's replies may run longer than a one-off answer

# Environment variables for the model options users set once: the CLI's -m, -r and -t, and
# the llm plugin's models, read them.
ENV_VARS = {"model": "ARGS_LOCAL_MODEL", "reward_model": "ARGS_LOCAL_REWARD_MODEL", "threads": "ARGS_LOCAL_THREADS"}
