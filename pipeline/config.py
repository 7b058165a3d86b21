"""`CompressConfig`: the single source of defaults for the CLI, the Makefile and the Prefect flow."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pipeline.errors import BadInputError
from pipeline.preprocessing import resolve

DATA_OPTIONS = ("val_fraction", "seed", "val_images", "memory_mb", "workers", "max_bad_fraction")
PREPROCESSING_FIELDS = ("mean", "std", "preprocessing", "resize", "crop", "interpolation")

# The training recipes: the values of the fields a recipe sets where no option gives them. scratch: the paper's
# from-initialization training. finetune: for trained weights, a tenth of the learning rate, half the epochs and
# Iterative SNIP's masks, the best of four methods on a trained resnet18 one-shot and fine-tuned at 90-99% sparsity
# (benchmarks/bench_trained.py; README "A trained model in").
RECIPES: dict[str, dict] = {
    "scratch": {"method": "force", "epochs": 10, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4},
    "finetune": {"method": "iter_snip", "epochs": 5, "optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-5},
}
# Networks with attention (ViT, DeiT, Swin, the hybrids) train with AdamW and decoupled weight decay, as they are
# trained everywhere: SGD at lr 0.1 left ViT-Tiny at chance on digits at 90% (README "Vision transformers").
ATTENTION_RECIPES: dict[str, dict] = {
    "scratch": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    "finetune": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05},
}


def resolve_budget(budget: str | None, structure: str, weight_sparsity: float | None = None,
                   channel_ranking: str = "global") -> str:
    """What --sparsity counts: the budget given, else MACs for channels (they are cut for speed) and weights for
    single weights. Raises ValueError for a MACs budget on single weights, for a --weight-sparsity that is not a
    fraction in [0, 1) beside a channel budget of MACs or time, and for a --channel-ranking without channels."""
    if budget is None:
        budget = "macs" if structure == "channel" else "params"
    elif budget in ("macs", "latency") and structure != "channel":
        raise ValueError(f"--budget {budget} needs --structure channel: zeros inside dense weights do not lower the "
                         "MACs or the time a runtime computes")
    if weight_sparsity is not None and (structure != "channel" or budget == "params" or not 0 <= weight_sparsity < 1):
        raise ValueError(f"--weight-sparsity is a second budget, a fraction in [0, 1) (got {weight_sparsity:g}), "
                         "beside --budget macs or latency with --structure channel; for weights alone give --sparsity "
                         "with --budget params")
    if channel_ranking != "global" and structure != "channel":
        raise ValueError(f"--channel-ranking {channel_ranking} ranks channels: it needs --structure channel")
    return budget


def recipe_values(recipe: str, attention: bool = False) -> dict:
    """The fields `recipe` sets, for a network with attention or without."""
    return {**RECIPES[recipe], **(ATTENTION_RECIPES[recipe] if attention else {})}

RECIPE_METHODS = ", ".join(f"{name}: {recipe['method']}" for name, recipe in RECIPES.items())
FINETUNE_SUMMARY = "iter_snip masks, SGD lr 0.01, cosine, 5 epochs, weight decay 5e-5, calibrated train-time BatchNorm"


class CompressConfig(BaseModel):
    """One compression request. Density = kept fraction, sparsity = pruned fraction; the user
    speaks sparsity, `force_core` speaks density, and `density` converts once, here."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _from_recipe: frozenset[str] = PrivateAttr(default=frozenset())  # fields no option gave: the recipe's values

    model: str = Field(description="path to the input ONNX classifier")
    sparsity: float = Field(0.9, gt=0.0, lt=1.0, description="fraction of prunable weights to remove")
    method: str | None = Field(
        None, description="mask method: force, iter_snip, snip, grasp, synflow, magnitude, random (channel structure: "
                          "force, iter_snip, snip, magnitude, random). Default: the recipe's (" + RECIPE_METHODS + ")")
    structure: Literal["unstructured", "channel"] = Field(
        "unstructured", description="unstructured: single weights (the paper's method; same dense file, zeros "
                                    "inside); channel: whole channels, cut out of the graph (smaller, faster file)")
    steps: int = Field(20, ge=1, le=1000, description="pruning steps (iterative methods)")
    schedule: Literal["exp", "linear"] = Field("exp", description="density schedule over the pruning steps")
    channel_multiple: int | None = Field(
        None, ge=1, description="channel structure: channels are kept in blocks of this many per layer group. "
                                "Default: the block the runtime computes channels in, asked of onnxruntime on the "
                                "device the run uses (CPU: 16 with AVX-512, 8 with AVX2; CUDA: 8); give the serving "
                                "machine's when it differs")
    budget: Literal["params", "macs", "latency"] | None = Field(
        None, description="channel structure: what --sparsity removes: params (weights: the file's size), macs "
                          "(multiply-accumulates per image, where activations are large) or latency (each layer's "
                          "time, measured alone on onnxruntime at --latency-batch and cached). Default: macs for "
                          "--structure channel, params otherwise")
    channel_ranking: Literal["global", "per-group"] = Field(
        "global", description="channel structure: global ranks channels by their saliency, as FORCE ranks weights; "
                              "per-group by their saliency over their group's mean, so that a MACs or latency budget "
                              "spreads over the layers by what their channels cost: at a given size, resnet50 at init "
                              "ran twice as fast; on a trained model it cut the early layers and lost accuracy "
                              "(README, --channel-ranking)")
    latency_batch: int = Field(1, ge=1, le=4096, description="channel structure: the batch the model serves at; "
                                                               "--budget latency and --target-latency time it there")
    target_latency: float | None = Field(
        None, gt=0.0, lt=1.0, description="channel structure: the cut model's latency as a fraction of the input's "
                                          "at --latency-batch on onnxruntime (e.g. 0.45); the sparsity is searched "
                                          "for it instead of taken from --sparsity, and the gate checks the measured "
                                          "ratio")
    weight_sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="channel structure with --budget macs or latency: also remove at least this "
                                          "fraction of the prunable weights (a file size beside the compute or time "
                                          "budget); the channels kept fit both, and the gate checks both")
    mask_batches_per_step: int = Field(1, ge=1, description="mini-batches averaged per pruning step")
    mask_batch_size: int = Field(128, ge=1, description="images per pruning mini-batch")
    min_per_layer: int = Field(1, ge=0, description="weights every prunable layer keeps at least (0: none, as the "
                                                    "paper; an empty layer cuts every path through it)")
    on_collapse: Literal["nested", "none"] = Field(
        "nested", description="FORCE, once the masked network is nearly cut (outputs spread over a batch < 1/10 of "
                              "the dense network's): nested = back to the mask before and Iterative SNIP's nested "
                              "steps from there; none = FORCE as published")

    data: str = Field("digits", description="data spec: digits | imagefolder:PATH | npz:PATH")
    image_size: tuple[int, int] | None = Field(None, description="H W for models with dynamic spatial size")
    mean: list[float] | None = Field(
        None, description="per-channel mean the model's input is normalised with, (x - mean) / std, as the model was "
                          "trained (e.g. 0.485,0.456,0.406); give it with --std. Default: the input file's "
                          "force_compress.preprocessing metadata, else the training split's")
    std: list[float] | None = Field(None, description="per-channel std of that normalisation (e.g. 0.229,0.224,0.225); "
                                                      "give it with --mean")
    preprocessing: str | None = Field(
        None, description="a named preprocessing preset: imagenet = torchvision's ImageNet eval transform (shorter "
                          "side 256 bilinear, centre crop 224, ImageNet mean/std); options given beside it win")
    resize: str | None = Field(None, description="resize before the crop: N (shorter side to N, aspect kept) or HxW. "
                                                 "Default: the preset's, else the input file's record, else straight "
                                                 "to the model's input size")
    crop: str | None = Field(None, description="centre crop HxW (or N for NxN) after --resize: the model's input size")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="resize interpolation (antialiased when shrinking) [default: bilinear]")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="held-out fraction scored by validation")
    val_images: int | None = Field(None, ge=1, description="score at most this many held-out images at each gate (a "
                                                           "seeded, stratified choice; recorded in the report)")
    memory_mb: float = Field(512.0, ge=0.0, description="an image folder or shard set whose decoded images fit in "
                                                        "this many MB is held in memory; a larger one is streamed "
                                                        "from disk batch by batch")
    workers: int | None = Field(None, ge=0, description="DataLoader worker processes decoding streamed images "
                                                        "[default: one per core, at most 8]")
    max_bad_fraction: float = Field(0.001, ge=0.0, le=1.0, description="unreadable images are skipped, counted and "
                                                                       "named in the report; more than this fraction "
                                                                       "of the images read stops the run (exit 2)")
    augment: bool = Field(True, description="random crop and flip while training")
    train_norm: bool = Field(True, description="BatchNorm-fused layers get a BatchNorm for masks and training, "
                                               "folded back at export (the graph keeps its nodes)")

    recipe: Literal["auto", "finetune", "scratch"] = Field(
        "auto", description="training recipe: scratch (SGD lr 0.1, cosine, 10 epochs, weight decay 5e-4), finetune "
                            "(for trained weights: " + FINETUNE_SUMMARY + "), or auto: finetune when the input "
                            "scores well above chance on the held-out split. Options given beside it win")
    epochs: int | None = Field(None, ge=0, le=10000, description="sparse-training epochs")
    max_steps: int | None = Field(None, ge=1, description="train for this many optimizer steps instead of --epochs "
                                                          "(bounded work for a CI step; the last epoch may be partial)")
    batch_size: int = Field(128, ge=1, description="training batch size")
    optimizer: Literal["sgd", "adamw"] | None = Field(
        None, description="sgd (momentum) or adamw. Default: the recipe's (sgd; adamw for a network with attention)")
    lr: float | None = Field(None, gt=0.0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float | None = Field(None, ge=0.0, description="weight decay")
    lr_schedule: Literal["cosine", "step"] = Field("cosine", description="cosine, or step (x0.1 at 50% and 75%)")
    seed: int = Field(0, description="seed for masks, data split and training")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device (onnxruntime follows)")
    nproc: int = Field(1, ge=1, description="processes for the sparse-train stage (data-parallel under torchrun): "
                                            "one per GPU where there are GPUs (NCCL), else CPU processes (gloo); "
                                            "the other stages run once")

    storage: Literal["dense", "sparse"] = Field("dense", description="exported weights: dense, or sparse_initializer")
    quantize: Literal["none", "int8"] = Field(
        "none", description="also publish an INT8 model (onnxruntime static quantization, QDQ, calibrated on "
                            "training images), gated like the FP32 one")
    min_accuracy: float = Field(0.5, ge=0.0, le=1.0, description="gate: minimum top-1 on the held-out split")
    baseline_accuracy: float | None = Field(None, ge=0.0, le=1.0, description="gate: accuracy to compare against")
    max_drop: float | None = Field(None, ge=0.0, le=1.0, description="gate: largest allowed drop from baseline")
    parity_tol: float = Field(1e-4, gt=0.0, description="max relative torch/onnxruntime difference")
    cut_check: bool = Field(True, description="stop before training when the masks cut every input→output path")

    name: str | None = Field(None, description="model name in the registry (default: the file's stem)")
    registry: str = Field("registry", description="registry directory, or mlflow:URI for an MLflow Model Registry "
                                                  "(mlflow:sqlite:///PATH.db or mlflow:http://HOST:PORT)")
    runs_dir: str = Field("runs", description="where run directories go")
    keep_checkpoint: bool = Field(False, description="keep the run directory's checkpoint.pt (resumable training "
                                                     "state) once trained.pt is written")

    @model_validator(mode="after")
    def _recipe_values(self) -> CompressConfig:
        """Fields no option gives take the recipe's values (auto: scratch's until the input is scored and
        `with_recipe` settles it)."""
        recipe = RECIPES["scratch" if self.recipe == "auto" else self.recipe]
        unset = frozenset(k for k in recipe if getattr(self, k) is None)
        for k in unset:
            object.__setattr__(self, k, recipe[k])
        self._from_recipe = unset
        return self

    @model_validator(mode="after")
    def _known_method(self) -> CompressConfig:
        from force_core import available_methods

        known = available_methods(self.structure)
        if self.method not in known:
            kind = "" if self.structure == "unstructured" else f"{self.structure} "
            raise ValueError(f"unknown {kind}method {self.method!r}; "
                             f"choose one of {', '.join(sorted(known))}")
        return self

    @model_validator(mode="after")
    def _budget(self) -> CompressConfig:
        object.__setattr__(self, "budget", resolve_budget(self.budget, self.structure, self.weight_sparsity,
                                                         self.channel_ranking))
        if self.target_latency is not None and self.structure != "channel":
            raise ValueError("--target-latency needs --structure channel: zeros inside dense weights do not make "
                             "the model faster on onnxruntime")
        return self

    def with_recipe(self, recipe: str, attention: bool = False) -> CompressConfig:
        """This config under `recipe` ("scratch" or "finetune") for a network with attention or without: the fields
        no option gave take its values."""
        values = recipe_values(recipe, attention)
        update = {k: values[k] for k in self._from_recipe}
        return self.model_copy(update={**update, "recipe": recipe})

    def given(self) -> dict:
        """The fields as given: those the recipe filled in are None again (what a new config from them fills the
        same way; the Prefect flow's parameters)."""
        return {k: None if k in self._from_recipe else v for k, v in self.model_dump().items()}

    @model_validator(mode="after")
    def _preprocessing(self) -> CompressConfig:
        """What the options say of the preprocessing holds together (the model is checked with the request)."""
        if (self.mean is None) != (self.std is None):
            raise ValueError("give --mean and --std together (one value per input channel each)")
        if self.mean is not None and (not self.mean or len(self.mean) != len(self.std)):
            raise ValueError(f"--mean has {len(self.mean)} values and --std {len(self.std)}: one per input "
                             "channel each")
        try:
            resolve(self.preprocessing_options())
        except BadInputError as e:
            raise ValueError(str(e)) from None
        return self

    def preprocessing_options(self) -> dict:
        """The preprocessing the options state (pipeline.preprocessing.resolve's `options`)."""
        return {name: getattr(self, name) for name in PREPROCESSING_FIELDS}

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def model_name(self) -> str:
        return self.name or Path(self.model).stem

    def fingerprint(self) -> dict:
        """Fields that change the result (not where it goes or what is kept of it)."""
        return self.model_dump(exclude={"registry", "runs_dir", "name", "model", "keep_checkpoint"})


class UndeclaredFieldError(RuntimeError):
    """A stage read a config field it does not declare: its cache key would miss a change of that field."""


class ConfigView:
    """A read-only view of a CompressConfig that lets through only the fields a stage declares, and the properties
    computed from them (`density`, `model_name`). Reading any other field raises UndeclaredFieldError, so a cache key
    built from the declared fields cannot miss something the stage reads."""

    DERIVED = {"density": frozenset({"sparsity"}), "model_name": frozenset({"name", "model"})}

    def __init__(self, config: CompressConfig, fields) -> None:
        fields = frozenset(fields)
        unknown = fields - set(CompressConfig.model_fields)
        if unknown:
            raise ValueError(f"not CompressConfig fields: {', '.join(sorted(unknown))}")
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_fields", fields)

    @property
    def declared_fields(self) -> frozenset[str]:
        return self._fields

    def values(self) -> dict:
        """The declared fields and their values (what a cache key hashes)."""
        return {name: getattr(self._config, name) for name in sorted(self._fields)}

    def __getattr__(self, name: str):
        if name.startswith("_"):  # copy/pickle probing, and an instance not yet initialised
            raise AttributeError(name)
        needs = self.DERIVED.get(name, frozenset({name}))
        if needs <= self._fields:
            return getattr(self._config, name)
        if name in CompressConfig.model_fields or hasattr(CompressConfig, name):
            raise UndeclaredFieldError(f"config.{name} is read but not declared (declared: "
                                       f"{', '.join(sorted(self._fields))})")
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        raise TypeError("a ConfigView is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({', '.join(f'{k}={v!r}' for k, v in self.values().items())})"


def data_options(config: CompressConfig | ConfigView) -> dict:
    """What pipeline.data.load_data takes from a config (or a stage's view of it) besides the preprocessing."""
    return {name: getattr(config, name) for name in DATA_OPTIONS}


def make_config(**values) -> CompressConfig:
    """Build a config, turning pydantic's multi-line report into one clear line (exit code 2)."""
    try:
        return CompressConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        if not first["loc"]:  # a check across fields: its message names them
            raise BadInputError(first["msg"].removeprefix("Value error, ")) from None
        field = ".".join(str(p) for p in first["loc"]) or "config"
        raise BadInputError(f"invalid {field}: {first['msg']} (got {first.get('input')!r})") from None
