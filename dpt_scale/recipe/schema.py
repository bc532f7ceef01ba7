"""The recipe schema: every key a recipe may hold, with its type and default.

A recipe is YAML; `dpt_scale.recipe.load` checks it against these dataclasses. Every float must be
finite. A key's `metadata` may carry rules the loader enforces: bounds ("min", "max" inclusive,
"above", "below" exclusive), "nonempty" for strings, and for lists "length", "sum_max" and
"items" (the rules of each value). Relative paths are taken
from the directory the command runs in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dpt_scale.errors import RecipeError

MiB = 2**20
NONEMPTY = {"nonempty": True}
SEED = {"min": 0}  # numpy's generators take no negative seed


def positive(default, **extra):
    return field(default=default, metadata={"min": 1, **extra})


@dataclass
class LabelledSubset:
    """Which training images keep their label: K per class, or the keys/file names in a list."""

    per_class: int = positive(4)
    seed: int = field(default=0, metadata=SEED)
    list: str | None = None  # a file of keys or file names (n01440764_10026.JPEG), one per line


@dataclass
class Loader:
    """How training code streams a shard set (see dpt_scale.shards.loader)."""

    workers: int = field(default=2, metadata={"min": 0})
    # Virtual streams per rank: the sample order depends on this, not on `workers`,
    # which must divide it. 24 admits 1, 2, 3, 4, 6, 8, 12 or 24 workers.
    streams: int = positive(24)
    shuffle_buffer: int = positive(4096)  # raw samples held for shuffling per rank, shared by the streams
    on_corrupt: Literal["error", "skip"] = "error"


@dataclass
class WebDatasetInput:
    """`data.source: webdataset`: which members of the input shards' samples hold the image and the label."""

    image: str = field(default="jpg;png;webp", metadata=NONEMPTY)  # webdataset's `;`: the first field present
    # FIELD (`cls`, `txt`: an integer, or a class name), FIELD:KEY (a key of a JSON member, e.g.
    # json:label; KEY may be a dotted path), or `none` (import without labels)
    label: str = field(default="cls", metadata=NONEMPTY)
    # class names in index order, or a text file of them one per line; labels that are not
    # integers are looked up here. Default: classes 0..max label, named by their index.
    classes: list[str] | str | None = field(default=None, metadata={"nonempty": True, "items": NONEMPTY})


@dataclass
class Data:
    """Where images come from (`data import`) and where their shards live."""

    source: Literal["mnist", "imagefolder", "idx", "webdataset"] = "mnist"
    # imagefolder: [ROOT]; idx: [IMAGES, LABELS]; webdataset: URLs (data-{000000..000099}.tar, pipe:CMD)
    paths: list[str] = field(default_factory=list, metadata={"items": NONEMPTY})
    val_paths: list[str] = field(default_factory=list, metadata={"items": NONEMPTY})  # same form, for validation
    val_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 0.5})
    # shard sets go to ROOT/train and ROOT/val; default <out>/data
    root: str | None = field(default=None, metadata=NONEMPTY)
    image_size: int | None = field(default=None, metadata={"min": 1})  # resize + centre crop
    channels: Literal[1, 3] | None = None  # default: what the source has (1 for MNIST, else 3)
    format: Literal["png", "jpg", "webp"] = "png"
    quality: int = field(default=95, metadata={"min": 1, "max": 100})  # jpg / webp
    shard_samples: int = positive(1000)
    shard_bytes: int = positive(256 * MiB)
    import_workers: int = positive(2)
    seed: int = field(default=0, metadata=SEED)  # shuffles the import order so that every shard mixes all classes
    webdataset: WebDatasetInput = field(default_factory=WebDatasetInput)
    labelled: LabelledSubset = field(default_factory=LabelledSubset)
    loader: Loader = field(default_factory=Loader)


@dataclass
class Train:
    """One DeepSpeed training run; the diffusion and classifier stages each have one."""

    steps: int = positive(1000)  # optimizer steps
    micro_batch: int = positive(64)  # samples per rank per forward/backward
    grad_accum: int | None = field(default=None, metadata={"min": 1})  # default: from global_batch, else 1
    global_batch: int | None = field(default=None, metadata={"min": 1})  # checked: micro x accum x ranks
    lr: float = field(default=2e-4, metadata={"min": 0.0})
    weight_decay: float = field(default=0.03, metadata={"min": 0.0})
    betas: list[float] = field(default_factory=lambda: [0.99, 0.99],
                               metadata={"length": 2, "items": {"min": 0.0, "below": 1.0}})
    warmup_steps: int = field(default=0, metadata={"min": 0})
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # after the warm-up
    grad_clip: float = field(default=0.0, metadata={"min": 0.0})  # 0: no clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "cpu"] = "none"  # optimizer state to CPU memory (ZeRO 1-3)
    ema_decay: float = field(default=0.9999, metadata={"min": 0.0, "max": 1.0})
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): short runs get a usable EMA
    checkpoint_every: int = positive(500)
    keep_checkpoints: int = positive(2)
    log_every: int = positive(10)
    sample_every: int = field(default=0, metadata={"min": 0})  # PNG grid of EMA samples; 0: never
    deepspeed: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config, merged over ours


@dataclass
class DiffusionTrain(Train):
    # 0 with diffusion.init: no training, the checkpoint exported as it is (to sample from it)
    steps: int = field(default=1000, metadata={"min": 0})


@dataclass
class UViTModel:
    size: Literal["tiny", "mini", "S", "M", "L", "H"] = "tiny"
    patch_size: int = positive(2)
    attention: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    conv: bool = True  # 3x3 conv after unpatchify (pixel models); latent models usually go without
    mlp_time_embed: bool = False
    qkv_bias: bool = False
    grad_checkpointing: bool = False


@dataclass
class Latent:
    autoencoder: str | None = None  # local diffusers AutoencoderKL directory; none: pixel space
    scale_factor: float | None = None  # default: the autoencoder's (0.18215 for SD's)
    encode_batch: int = positive(32)  # images per autoencoder encode pass (`dpt-scale encode`)


@dataclass
class Diffusion:
    model: UViTModel = field(default_factory=UViTModel)
    # Stage 2 conditions on the stage-1 pseudo-labels (unselected images train the null class only);
    # `ground_truth` uses the shards' own labels: the oracle comparison run, not a semi-supervised one.
    labels: Literal["pseudo", "ground_truth"] = "pseudo"
    schedule: Literal["sd_discrete", "linear_vp"] = "linear_vp"
    # What the network predicts: the noise (the paper's) or v = alpha noise - sigma x0, which trains
    # usable models in far fewer steps (see diffusion/loss.py).
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    label_dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})  # to the null class (CFG)
    flip: bool = False  # random horizontal flips (not for digits)
    # In-training FID: this many unguided EMA samples every train.sample_every steps, scored with
    # the `evaluate` section's evaluator and reference (0: grids only).
    fid_samples: int = field(default=0, metadata={"min": 0})
    latent: Latent = field(default_factory=Latent)
    # A U-ViT checkpoint to start from (the reference's layout, e.g. the published ImageNet files,
    # or a train-diffusion weights.pt): weights and EMA of a fresh run; a resumed run takes its own.
    init: str | None = field(default=None, metadata=NONEMPTY)
    train: DiffusionTrain = field(default_factory=DiffusionTrain)

    def __post_init__(self):
        if self.train.steps == 0 and self.init is None:
            raise RecipeError("'diffusion.train.steps' is 0, which trains nothing: set diffusion.init to a "
                              "checkpoint to sample from it as it is, or train at least 1 step")


@dataclass
class ClassifierModel:
    """Any timm model by name (`timm.list_models()`)."""

    name: str = "resnet10t"
    # A local timm weights file (nothing is downloaded), or `pretrain`: the stage-0 backbone of this run.
    pretrained: str | None = None
    input_size: int | None = field(default=None, metadata={"min": 1})  # resize images to this first
    # Centre crop of this fraction of the side before the resize (timm's crop_pct; 0.875 = the usual
    # 224-of-256 evaluation crop); none: the whole image.
    crop_pct: float | None = field(default=None, metadata={"min": 0.05, "max": 1.0})
    # Extra timm.create_model arguments, e.g. {patch_size: 7, final_norm: false} for an MSN ViT-L/7 on
    # vit_large_patch16_224 (architectures timm has no name for).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Pixel normalisation, per channel: default the pretrained weights' own, else 0.5 / 0.5.
    mean: list[float] | None = None
    std: list[float] | None = field(default=None, metadata={"items": {"above": 0.0}})


@dataclass
class Augment:
    """Weak view: random translation (+ flips); strong view (FixMatch): weak + RandAugment + cutout."""

    flip: bool = False  # horizontal flips (not for digits)
    translate: float = field(default=0.125, metadata={"min": 0.0, "max": 0.5})  # of the image side
    randaugment: str = "rand-m10-n2-mstd0.5"  # timm's RandAugment config string
    cutout: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})  # square side, fraction of the image


@dataclass
class FixMatch:
    threshold: float = field(default=0.95, metadata={"min": 0.0, "max": 1.0})  # confidence for a pseudo target
    unlabelled_ratio: int = positive(7)  # unlabelled images per labelled image in a batch (mu)
    unlabelled_weight: float = field(default=1.0, metadata={"min": 0.0})  # lambda_u


@dataclass
class LinearProbe:
    l2: float = field(default=1e-4, metadata={"min": 0.0})  # penalty 0.5 * l2 * |W|^2 on the linear layer


@dataclass
class PseudoLabel:
    batch: int = positive(256)
    workers: int = field(default=2, metadata={"min": 0})  # decoding processes per rank
    # Which pseudo-labels stage 2 may use: confidence at least `threshold`, and/or the
    # `top_per_class` most confident of each class (0: all).
    threshold: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    top_per_class: int = field(default=0, metadata={"min": 0})


@dataclass
class Retrain:
    """Stage 4: the stage-1 method again, its labelled part joined by pseudo-image shard sets."""

    # generated: the pseudo images of stage 3 (or the sets in `pseudo`). real: the self-training
    # control, which takes per_class real training images of each pseudo-class instead, most confident
    # first, with their stage-1 pseudo-labels; stages 2 and 3 then do not run.
    source: Literal["generated", "real"] = "generated"
    # Images of each class taken from each set (generated: the first K; real: the K most confident);
    # default: all a generated set holds, sample.per_class real ones.
    per_class: int | None = field(default=None, metadata={"min": 1})
    pseudo: list[str] = field(default_factory=list)  # shard sets of pseudo images; default [<out>/samples]
    # Share of each labelled micro-batch that comes from each pseudo set (the rest: real labelled images).
    pseudo_fraction: list[float] = field(default_factory=lambda: [0.5],
                                         metadata={"items": {"min": 0.0}, "sum_max": 1.0})
    train: Train | None = None  # the stage-1 settings, with the keys given here changed


@dataclass
class Classifier:
    method: Literal["fixmatch", "supervised", "linear_probe"] = "fixmatch"
    model: ClassifierModel = field(default_factory=ClassifierModel)
    augment: Augment = field(default_factory=Augment)
    fixmatch: FixMatch = field(default_factory=FixMatch)
    linear_probe: LinearProbe = field(default_factory=LinearProbe)
    # micro_batch counts labelled images (real + pseudo); fixmatch adds unlabelled_ratio x as many unlabelled.
    train: Train = field(default_factory=lambda: Train(micro_batch=16, lr=2e-3, weight_decay=0.05,
                                                       betas=[0.9, 0.999], ema_decay=0.999))
    pseudo_label: PseudoLabel = field(default_factory=PseudoLabel)
    retrain: Retrain = field(default_factory=Retrain)


@dataclass
class PretrainAugment:
    """The views a self-supervised method compares: random affine warps, flips, colour and cutout,
    drawn per image on the device (pretrain/augment.py)."""

    # Side scale factor, drawn in [min, max]: above 1 zooms in (a crop), below 1 zooms out.
    zoom: list[float] = field(default_factory=lambda: [0.8, 1.2], metadata={"length": 2, "items": {"above": 0.0}})
    rotate: float = field(default=15.0, metadata={"min": 0.0, "max": 180.0})  # degrees, either way
    translate: float = field(default=0.15, metadata={"min": 0.0, "max": 1.0})  # of the side, either way
    shear: float = field(default=10.0, metadata={"min": 0.0, "max": 45.0})  # degrees, either way
    flip: bool = False  # horizontal flips (not for digits)
    color: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # brightness/contrast/saturation jitter
    grayscale: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # probability (RGB)
    erase: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})  # probability of a cutout square
    erase_size: float = field(default=0.35, metadata={"min": 0.0, "max": 1.0})  # its side, of the image's


@dataclass
class SimCLR:
    temperature: float = field(default=0.5, metadata={"min": 1e-3})
    # hidden and output widths
    projection: list[int] = field(default_factory=lambda: [256, 128], metadata={"items": {"min": 1}})


@dataclass
class MSN:
    """Masked Siamese Networks (Assran et al. 2022): masked anchor views matched to an unmasked
    target view of the EMA encoder (the target network) through learnt prototypes."""

    mask_ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 0.95})  # patch tokens dropped
    anchors: int = positive(2)  # masked anchor views per image
    prototypes: int = positive(256)
    # hidden and output widths
    projection: list[int] = field(default_factory=lambda: [512, 128], metadata={"items": {"min": 1}})
    anchor_temperature: float = field(default=0.1, metadata={"min": 1e-3})
    target_temperature: float = field(default=0.025, metadata={"min": 1e-3})
    me_max: float = field(default=1.0, metadata={"min": 0.0})  # weight of mean-entropy maximisation
    sinkhorn: bool = True  # balance the targets over the prototypes (Sinkhorn-Knopp), as the reference does


@dataclass
class RotationEnhance:
    # Image-enhancement classes a second head predicts, besides the rotation (pretrain/enhance.py).
    enhancements: list[str] = field(default_factory=lambda: ["none", "blur", "sharpen", "solarize", "posterize"])


@dataclass
class KNNProbe:
    """Evaluation only: leave-one-out k-NN top-1 of the EMA backbone's features on the validation
    shards (their labels never reach training), every `every` steps and at the end."""

    every: int = field(default=0, metadata={"min": 0})  # 0: at the end only
    k: int = positive(20)
    samples: int = positive(2000)  # the first N validation images


@dataclass
class Pretrain:
    """Stage 0: a self-supervised backbone (`classifier.model`) from the training shards; no label is
    read. It runs when classifier.model.pretrained is `pretrain`, which then names its output."""

    method: str = "simclr"  # a name of dpt_scale.pretrain.METHODS
    # default: the recipe's; fixed, one backbone serves a study's every seed
    seed: int | None = field(default=None, metadata=SEED)
    # Where stage 0 writes; default <out>/pretrain. A folder outside the run is shared between runs:
    # reused when it holds this backbone, refused when it holds another.
    out: str | None = None
    augment: PretrainAugment = field(default_factory=PretrainAugment)
    simclr: SimCLR = field(default_factory=SimCLR)
    msn: MSN = field(default_factory=MSN)
    rotation_enhance: RotationEnhance = field(default_factory=RotationEnhance)
    knn: KNNProbe = field(default_factory=KNNProbe)
    # micro_batch counts images; a method may look at several views of each.
    train: Train = field(default_factory=lambda: Train(micro_batch=256, lr=2e-3, weight_decay=1e-4,
                                                       betas=[0.9, 0.999], ema_decay=0.99))


@dataclass
class Sample:
    """Stage 3: pseudo images from the stage-2 EMA model, written as the shard set <out>/samples."""

    per_class: int = positive(128)  # K images of every class ...
    total: int | None = field(default=None, metadata={"min": 1})  # ... or N, classes drawn per image
    class_distribution: Literal["uniform", "pseudo_labels"] = "uniform"  # for `total`
    solver: Literal["dpm_solver++", "ddpm"] = "dpm_solver++"  # ddpm: ancestral, for comparisons
    steps: int = positive(50)
    guidance: float = field(default=1.4, metadata={"min": 0.0})  # eps_null + w (eps_class - eps_null)
    seed: int | None = field(default=None, metadata=SEED)  # default: the recipe's
    batch: int = positive(256)  # images per forward pass (x2 with guidance)
    decode_batch: int = positive(32)  # latent recipes: images per autoencoder decode
    shard_samples: int = positive(1000)
    format: Literal["png", "jpg", "webp"] = "png"
    quality: int = field(default=95, metadata={"min": 1, "max": 100})  # jpg / webp
    encode_threads: int = positive(2)  # background image encoding and writing
    checkpoint: str | None = None  # default <out>/diffusion/weights.pt
    # bf16: the U-ViT's weights and activations in bfloat16 (for GPUs with bf16 tensor cores; the
    # solver's state and the autoencoder stay fp32). Images then differ slightly from fp32 ones.
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class TrainedEvaluator:
    """`dpt-scale make-evaluator`: an evaluation-only classifier on every true label of
    <data.root>/train, for data sets no shipped evaluator knows. Never used in training."""

    weights: str | None = None  # default <data.root>/evaluator.pt
    model: str = "test_resnet"  # any timm model
    steps: int = positive(2000)
    micro_batch: int = positive(128)
    lr: float = field(default=3e-3, metadata={"min": 0.0})
    augment: Augment = field(default_factory=lambda: Augment(translate=0.1))  # the weak view only


@dataclass
class Evaluate:
    """Generation metrics (FID, KID, precision/recall, conditional accuracy) of <out>/samples."""

    # Feature extractor: `inception` (ImageNet practice; needs `inception_weights`, a local file of
    # torch-fidelity's pt_inception-2015-12-05 weights), `mnist` (an evaluation-only classifier
    # shipped with the package, trained on all labels of the embedded set) or `trained` (one that
    # `dpt-scale make-evaluator` trained on this data set's true labels). auto: mnist for the
    # embedded set, else a trained evaluator made for this training set, else inception.
    evaluator: Literal["auto", "mnist", "inception", "trained"] = "auto"
    inception_weights: str | None = None
    trained: TrainedEvaluator = field(default_factory=TrainedEvaluator)
    reference: str | None = None  # the real shard set to compare with; default <data root>/val
    kid_subset_size: int = positive(1000)
    batch: int = positive(256)


@dataclass
class Study:
    """`dpt-scale study`: the pipeline over several seeds, beside the controls that could explain
    its result away (dpt_scale/pipeline/study.py has each arm's settings)."""

    arms: list[str] = field(default_factory=lambda: ["dpt", "self_training", "supervised", "oracle"])
    # Recipe keys the `supervised` arm sets on top (it trains classifier.model from scratch on the
    # labelled images alone, so it may want other classifier.train settings than a linear probe).
    supervised: dict[str, Any] = field(default_factory=dict)


@dataclass
class WandB:
    """Weights & Biases (the `wandb` extra): one run per training stage; off unless `project` is set."""

    project: str | None = field(default=None, metadata=NONEMPTY)
    # offline: run files only, under each stage's folder (`wandb sync` uploads them); online: sent as it trains
    mode: Literal["offline", "online"] = "offline"
    entity: str | None = field(default=None, metadata=NONEMPTY)  # default: the W&B account's own
    group: str | None = field(default=None, metadata=NONEMPTY)  # default: the recipe's name


@dataclass
class Logging:
    """Experiment trackers for the training stages (rank 0 only); never part of what a stage makes."""

    # auto: TensorBoard events when the `tensorboard` extra is installed; true: required
    tensorboard: Literal["auto", True, False] = "auto"
    wandb: WandB = field(default_factory=WandB)


@dataclass
class Recipe:
    name: str = field(default="dpt", metadata=NONEMPTY)
    out: str = field(default="runs/dpt", metadata=NONEMPTY)  # every output of the run lives under this directory
    seed: int = field(default=0, metadata=SEED)
    data: Data = field(default_factory=Data)
    pretrain: Pretrain = field(default_factory=Pretrain)
    classifier: Classifier = field(default_factory=Classifier)
    diffusion: Diffusion = field(default_factory=Diffusion)
    sample: Sample = field(default_factory=Sample)
    evaluate: Evaluate = field(default_factory=Evaluate)
    study: Study = field(default_factory=Study)
    logging: Logging = field(default_factory=Logging)

    @property
    def data_root(self) -> str:
        return self.data.root or f"{self.out}/data"
