"""Options of `intraslice compress`, in a module without heavy imports (the CLI builds its parser from
these defaults without importing torch)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from intraslice.io import UserError

ALLOCATION_METHODS = ("global-pca", "global", "uniform")
FISHER_LABELS = ("sampled", "text")  # Fisher scores: next tokens drawn from the model (true Fisher), or the text's
SHAPE_SELECTIONS = ("error", "score")  # attention shape: lowest measured fit error, or the paper's score
MLP_SELECTIONS = ("score", "obs")  # MLP channels: the paper's score, or greedy elimination seeing the fold
AUTOCAST_CHOICES = ("auto", "bfloat16", "off")  # bfloat16 autocast where it is safe (intraslice.precision)
TARGETS = ("own", "dense")  # least-squares target: the module's own unpruned output, or the dense model's

# Head sizes vLLM's CPU attention backend accepts (GPU backends accept these too).
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MAX_RATIO = 0.9
MLP_RIDGE = 0.3  # ridge of the MLP's least-squares fold, times mean(diag C) (the paper: 0.01; see compress_mlp)


@dataclass
class CompressOptions:
    """Every knob of a run. Defaults are sized for the example model on 2 CPU cores; the paper uses
    128 x 2048 calibration tokens (`--samples 128 --seq-len 2048`, with enough text)."""
    ratio: float
    allocation: str = "global-pca"
    texts: tuple[str | None, ...] = (None,)  # calibration text sources (intraslice.data); None: built-in prose
    text_shares: tuple[float, ...] = ()  # each source's share of the text windows; empty: equal shares
    text_field: str = "text"
    samples: int = 64  # x 512 tokens; 32 lose 0.02-0.04x of same-domain perplexity (docs/results.md), 80 s faster
    generated_fraction: float = 0.5
    opening_share: float = 1.0  # of the generated samples, those started from register_openings.txt (docs/results.md)
    knowledge_fraction: float = 0.0625  # the dense model's statements (intraslice.generated); facts 6 -> 13 of 28
    seq_len: int = 512
    seed: int = 0
    allocation_samples: int = 16
    fisher_labels: str = "sampled"
    group_size: int = 4
    global_frac: int = 4
    attention_share: float | None = 0.0  # None: the paper's proportional split (see docs/results.md)
    head_dims: tuple[int, ...] = VLLM_HEAD_DIMS
    tp_size: int = 1
    mlp_multiple: int = 8
    compensate: bool = True
    mlp_ridge: float = MLP_RIDGE
    mlp_text_weight: float | None = None  # a text window's weight in the MLP fits; None: compressor.default_mlp_text_weight
    target: str = "own"
    shape_selection: str = "error"
    mlp_selection: str = "score"
    distill_steps: int = 64  # one per calibration sample (intraslice.distill); 32: pydoc 1.5% worse at R = 0.2; 0: none
    distill_lr: float = 2e-3
    distill_rank: int = 16
    distill_text_weight: float = 0.5  # the text windows' own next tokens in the distillation's loss; 0: the KL alone
    eval_samples: int = 16
    batch_size: int = 4
    device: str = "cpu"
    autocast: str = "auto"  # bfloat16 for the distillation's decoder passes, where fast (intraslice.precision)
    pop_skip: str | None = None
    overwrite: bool = False
    command: list[str] = field(default_factory=lambda: list(sys.argv))


def validate(options: CompressOptions) -> None:
    if not 0 <= options.ratio <= MAX_RATIO:
        raise UserError(f"--ratio {options.ratio} is out of range; it must be between 0 and {MAX_RATIO}")
    for flag, value, choices in (("--allocation", options.allocation, ALLOCATION_METHODS),
                                 ("--fisher-labels", options.fisher_labels, FISHER_LABELS),
                                 ("--shape-selection", options.shape_selection, SHAPE_SELECTIONS),
                                 ("--mlp-selection", options.mlp_selection, MLP_SELECTIONS),
                                 ("--autocast", options.autocast, AUTOCAST_CHOICES),
                                 ("--target", options.target, TARGETS)):
        if value not in choices:
            raise UserError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
    if options.pop_skip not in (None, "auto") and not str(options.pop_skip).isdigit():
        raise UserError(f"--pop-skip {options.pop_skip!r}: give auto or a number of layers")
    if options.tp_size < 1 or options.mlp_multiple < 1 or options.batch_size < 1 or options.group_size < 1:
        raise UserError("--tp-size, --mlp-multiple, --batch-size and --group-size must be >= 1")
    if any(d < 2 or d % 2 for d in options.head_dims):
        raise UserError(f"--head-dims {options.head_dims}: every head dim must be even and >= 2")
    if options.mlp_text_weight is not None and not options.mlp_text_weight > 0:
        raise UserError(f"--mlp-text-weight {options.mlp_text_weight} must be > 0")
    if options.mlp_ridge < 0:
        raise UserError(f"--mlp-ridge {options.mlp_ridge} must be >= 0")
    if not 0 <= options.generated_fraction <= 1:
        raise UserError(f"--generated-fraction {options.generated_fraction} must be between 0 and 1")
    if not 0 <= options.opening_share <= 1:
        raise UserError(f"--opening-share {options.opening_share} must be between 0 and 1")
    if not 0 <= options.knowledge_fraction <= 1 - options.generated_fraction:
        raise UserError(f"--knowledge-fraction {options.knowledge_fraction} must be between 0 and 1 - "
                        f"--generated-fraction ({1 - options.generated_fraction:g})")
    if options.attention_share is not None and not 0 <= options.attention_share <= 1:
        raise UserError(f"--attention-share {options.attention_share} must be between 0 and 1 (or proportional)")
    if options.distill_steps < 0 or options.distill_rank < 1 or not options.distill_lr > 0:
        raise UserError(f"--distill-steps must be >= 0, --distill-rank >= 1 and --distill-lr > 0 (got "
                        f"{options.distill_steps}, {options.distill_rank}, {options.distill_lr})")
    if not options.distill_text_weight >= 0:
        raise UserError(f"--distill-text-weight {options.distill_text_weight} must be >= 0")
    if not options.texts:
        raise UserError("give at least one --text source")
    if len(set(options.texts)) < len(options.texts):
        twice = next(t for t in options.texts if options.texts.count(t) > 1)
        raise UserError(f"--text {twice} is given twice; weight a source with --text-shares instead")
    if options.text_shares and len(options.text_shares) != len(options.texts):
        raise UserError(f"--text-shares gives {len(options.text_shares)} shares for {len(options.texts)} --text "
                        f"sources; give one per source, in the same order")
    if not all(0 < share < float("inf") for share in options.text_shares):
        raise UserError(f"--text-shares {' '.join(f'{s:g}' for s in options.text_shares)}: every share must be a "
                        f"positive number")
    if options.allocation_samples > options.samples:
        raise UserError(f"--allocation-samples {options.allocation_samples} exceeds --samples {options.samples}")
