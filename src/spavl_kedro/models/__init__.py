"""Model access: the backend kinds and their specs (`specs.py`), the factory that builds a backend from a spec
(`factory.py: BUILDERS`), tiny LLaVAs built offline (`tiny.py`), local and OpenAI-compatible VLMs (`vlm.py`),
the architecture table (`families.py`), CLIP (`clip.py`) and API pricing (`costs.py`)."""
