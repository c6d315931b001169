"""Model zoo: plain nn.Modules around an EmbeddingEngine. Each takes the
sparse fields (names, or {name: EmbeddingOption}), ``num_dense`` and
``dim``, and maps a batch (the fields, plus ``"dense"`` [B, num_dense]) to
logits [B]."""

from recis.models.dcn import DCNv2
from recis.models.deepfm import DeepFM
from recis.models.dlrm import DLRM
from recis.models.wide_deep import WideDeep

MODELS = {"deepfm": DeepFM, "dlrm": DLRM, "dcnv2": DCNv2, "wide_deep": WideDeep}

__all__ = ["DCNv2", "DLRM", "MODELS", "DeepFM", "WideDeep"]
