"""MoEE as a sentence-transformers model (optional extra: pip install 'moee-ref[sentence-transformers]').

    from sentence_transformers import SentenceTransformer
    from moee_ref.st import MoEE

    model = SentenceTransformer(modules=[MoEE("allenai/OLMoE-1B-7B-0924", "moee-sum", prompt="prompteol")])
    model.encode(texts)                              # == MoEEmbedder.encode(texts, "moee-sum", prompt="prompteol")
    model.save("olmoe-moee")                         # the settings and a pointer to the checkpoint, no pickle
    model = moee_ref.st.load("olmoe-moee")           # or SentenceTransformer("olmoe-moee", trust_remote_code=True)

`import moee_ref` never imports sentence-transformers; this package does, and raises MissingExtraError
without it.
"""

from __future__ import annotations

from ..errors import MissingExtraError

MISSING_ST = "moee_ref.st needs sentence-transformers 6 or later: pip install 'moee-ref[sentence-transformers]'"

try:
    from sentence_transformers.base.modules import InputModule  # noqa: F401  (sentence-transformers >= 6)
except ImportError as exc:
    raise MissingExtraError(MISSING_ST) from exc

from .module import CONFIG_FILE, MoEE, load  # noqa: E402

MoEE.__module__ = __name__  # modules.json names the class moee_ref.st.MoEE, wherever its code lives

__all__ = ["MoEE", "load", "CONFIG_FILE", "MISSING_ST"]
