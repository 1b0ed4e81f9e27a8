"""Judges: their specs and kinds (`specs.py: JUDGE_KINDS`), the judge classes and verdict parsers
(`core.py`), the builders (`factory.py: VERDICT_KINDS`), the tiny guards taught offline (`guard.py`), MIS's
three-level judge (`mis.py`) and the agreement statistics (`agreement.py`)."""
