"""``tests/vllm`` runs only where vLLM is installed (``make test-vllm``, in ``.venv-vllm``):
elsewhere (the main virtualenv, ``make test``) nothing here is even collected."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
