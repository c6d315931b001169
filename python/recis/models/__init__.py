"""Model zoo: plain nn.Modules around an EmbeddingEngine. Each takes the
sparse fields (names, or {name: EmbeddingOption}), ``num_dense`` and
``dim``, and maps a batch (the fields, plus ``"dense"`` [B, num_dense]) to
logits [B]. Every model takes ``dropout`` (after each hidden MLP layer's
activation; 0: none) and ``batch_norm`` (BatchNorm1d after each hidden
Linear, before its activation) for all its MLPs' hidden layers, never an
output layer; their defaults build the models as they were before these
options (the same parameters and ``state_dict`` names).
``model_spec(model)`` describes a zoo model as JSON and ``build_model(spec)``
rebuilds it (with fresh tables and weights).

Multi-task models (``recis.models.multitask``: ``shared_bottom``, ``mmoe``,
``esmm``) map a batch to logits [B, T], one column a task; they are
``MULTITASK_MODELS``, apart from ``MODELS`` (whose models' logits are [B]),
and ``ZOO`` holds both: the names a config's ``[model] name`` and
``build_model`` take.

The sequence models (``SEQUENCE_MODELS``: DIN, BST) read one field as a
behaviour sequence (``combiner="tuple"``, [B, L, D]) against a target item
field, named by their ``history`` and ``target`` arguments; the others pool
every field."""

from recis.models.bst import BST
from recis.models.common import model_spec
from recis.models.dcn import DCNv2
from recis.models.deepfm import DeepFM
from recis.models.din import DIN
from recis.models.dlrm import DLRM
from recis.models.multitask import ESMM, MMoE, SharedBottom
from recis.models.wide_deep import WideDeep

MODELS = {"deepfm": DeepFM, "dlrm": DLRM, "dcnv2": DCNv2, "wide_deep": WideDeep, "din": DIN, "bst": BST}
SEQUENCE_MODELS = sorted(n for n, cls in MODELS.items() if getattr(cls, "sequence_model", False))
MULTITASK_MODELS = {"shared_bottom": SharedBottom, "mmoe": MMoE, "esmm": ESMM}
ZOO = {**MODELS, **MULTITASK_MODELS}


def is_multitask(model) -> bool:
    """Whether ``model`` (a module or a zoo class) is a multi-task model
    (logits [B, T])."""
    return bool(getattr(model, "multitask", False))


def build_model(spec: dict, where: str = "model"):
    """The zoo model ``spec`` (from ``model_spec``) describes; a spec of an
    unknown model, or arguments it does not take, is a ValueError naming
    ``where``."""
    import inspect

    from recis.nn.options import option_from_json

    if not isinstance(spec, dict) or not {"name", "args", "features"} <= set(spec):
        raise ValueError(f"{where}: expected a model spec with name, args and features")
    cls = ZOO.get(spec["name"])
    if cls is None:
        raise ValueError(f"{where}: unknown model {spec['name']!r} (the zoo has {sorted(ZOO)})")
    args = spec["args"]
    features = spec["features"]
    if not isinstance(args, dict) or not isinstance(features, list) or not features:
        raise ValueError(f"{where}: args must be an object and features a non-empty list of [name, option]")
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in features):
        raise ValueError(f"{where}: features must be [name, option] pairs")
    names = [p[0] for p in features]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: features repeat: {names}")
    accepted = set(inspect.signature(cls).parameters) - {"sparse_fields", "option"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise ValueError(f"{where}: {spec['name']} takes no arguments {unknown}")
    options = {f: option_from_json(o, f"{where}.features.{f}") for f, o in features}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return cls(options, **kwargs)


__all__ = [
    "BST",
    "DCNv2",
    "DIN",
    "DLRM",
    "DeepFM",
    "ESMM",
    "MMoE",
    "MODELS",
    "MULTITASK_MODELS",
    "SEQUENCE_MODELS",
    "SharedBottom",
    "WideDeep",
    "ZOO",
    "build_model",
    "is_multitask",
    "model_spec",
]
