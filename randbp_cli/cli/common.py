"""What a command line says: the options commands share (defined once), torchrun's variables,
and the command as the user would retype it. Only the CLI reads `sys.argv` and the environment.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import RandbpError
from ..options import DEFAULT_SKETCH, SKETCH_NAMES

SKETCHES_HELP = (f"Sketch: {', '.join(SKETCH_NAMES)}. Repeat the option for several (--sketch gaussian --sketch "
                 f"countsketch). [default: {DEFAULT_SKETCH}]")
SKETCH_HELP = f"Sketch: {', '.join(SKETCH_NAMES)}."

# every command
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the JSON report to this file "
                                                   "(atomically, only once the run succeeded).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only the JSON report on stdout.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for weights, data, dropout and sketches.")]
DtypeOpt = Annotated[str, typer.Option(help="Model dtype: float32, bfloat16, float16, float64.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
OfflineOpt = Annotated[bool, typer.Option(help="Never contact the Hugging Face Hub.")]
IncludeOpt = Annotated[Optional[list[str]], typer.Option(metavar="PATTERN", help="Only randomize linear layers "
                                                          "matching this name pattern (suffix, glob or re:REGEX). "
                                                          "Repeat the option for several.")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(metavar="PATTERN", help="Never randomize layers matching "
                                                          "this pattern. Repeat the option for several.")]
SaverOpt = Annotated[Optional[list[str]], typer.Option(
    "--saver", metavar="NAME", help="Also save activation memory beyond linear layers: dropout (exact: a seed instead of each "
                    "mask; with eager attention also the attention-probability dropout), gelu:B (approximate: "
                    "B = 1-4 bits per GELU input instead of the input), gelu-new (exact: GPT-2's tanh GELU as one op, "
                    "its input kept, not four tensors), swiglu (exact: a Llama-family MLP keeps "
                    "gate and up, not SiLU(gate) too), lm-head (exact: a causal LM's loss computed block by block, "
                    "the logits never held). Repeat the option for several.")]
LoraOpt = Annotated[Optional[int], typer.Option(
    "--lora", metavar="RANK", help="Fine-tune with PEFT's LoRA adapters of this rank (base weights frozen); "
                                   "randomized methods then sketch the adapters' lora_A inputs. Needs peft.")]
LoraAlphaOpt = Annotated[Optional[float], typer.Option(help="LoRA's alpha (scaling alpha / rank). "
                                                            "[default: 2 × rank]")]
LoraDropoutOpt = Annotated[float, typer.Option(help="LoRA's dropout on the adapters' input.")]
LoraTargetsOpt = Annotated[Optional[list[str]], typer.Option(
    "--lora-targets", metavar="NAME", help="Module names LoRA adapts (PEFT's target_modules: q_proj, ...). "
                                           "Repeat the option for several. [default: all-linear]")]
SkipKeptOpt = Annotated[bool, typer.Option(
    "--skip-kept/--sketch-kept", help="Leave exact the layers whose input another op saves for backward anyway "
                                      "(found by one probe forward): sketching it would free nothing.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model, the same way for every "
                                                           "method (the report records the mode).")]
CompileModeOpt = Annotated[Optional[str], typer.Option(help="torch.compile mode with --compile: default, "
                                                             "reduce-overhead, max-autotune, "
                                                             "max-autotune-no-cudagraphs. [default: "
                                                             "reduce-overhead on CUDA, default elsewhere]")]
TolerancePeakOpt = Annotated[str, typer.Option(help="Allowed CUDA peak growth, e.g. 5% or 0.05.")]
ToleranceTimeOpt = Annotated[Optional[str], typer.Option(help="Allowed step-time growth; without it time is "
                                                              "informational.")]
ToleranceActivationOpt = Annotated[str, typer.Option(help="Allowed activation-byte growth (exact by default: the "
                                                          "number is deterministic).")]

# finetune and variance (the same data and model sources)
TaskOpt = Annotated[str, typer.Option(help="GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), "
                                           "'synthetic' (classification) or 'synthetic-lm' (next-token prediction, "
                                           "for a decoder): offline, generated from --seed.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Built-in architecture, hub id, checkpoint directory, or a "
                                                      "directory with only config.json. [default: roberta-base; "
                                                      "roberta-tiny for --task synthetic, llama-tiny for synthetic-lm]")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Batch size per step. "
                                                 "[default: the task's, 16 or 32]")]
LrOpt = Annotated[Optional[float], typer.Option(help="Peak learning rate. [default: the task's]")]
MaxLengthOpt = Annotated[int, typer.Option(help="Truncate inputs to this many tokens.")]
DataDirOpt = Annotated[Optional[Path], typer.Option(help="GLUE TSV files as distributed (DIR/MRPC/train.tsv), or "
                                                         "train/validation .csv/.jsonl/.parquet.")]
TrainFileOpt = Annotated[Optional[Path], typer.Option(help="Your own training file (.csv/.tsv/.jsonl/.parquet; "
                                                           "for a decoder, text: .txt, one example per line).")]
ValidationFileOpt = Annotated[Optional[Path], typer.Option("--validation-file", "--eval-file",
                                                           help="Your own evaluation file.")]
TextColumnsOpt = Annotated[Optional[str], typer.Option(help="With --train-file: one or two text columns, "
                                                            "comma-separated (a decoder's: one, default text).")]
LabelColumnOpt = Annotated[str, typer.Option(help="With --train-file: the label column.")]
MaxTrainOpt = Annotated[Optional[int], typer.Option(help="Use only the first N training examples.")]
MaxEvalOpt = Annotated[Optional[int], typer.Option(help="Use only the first N evaluation examples.")]


def one_line(message: str) -> str:
    """A message as one line (the CLI's errors are one stderr line each)."""
    return " ".join(message.split())


def note(message: str) -> None:
    """A plain line on stderr (never wrapped or styled: logs and tests read it)."""
    typer.echo(message, err=True)


def _split_columns(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    return [c.strip() for c in value.split(",") if c.strip()]


def data_options(task, model, data_dir, train_file, validation_file, text_columns, label_column,
                 max_train_samples, max_eval_samples, offline) -> dict:
    """The FinetuneConfig fields finetune and variance fill the same way."""
    return dict(task=task.lower(), model=model, data_dir=None if data_dir is None else str(data_dir),
                train_file=None if train_file is None else str(train_file),
                validation_file=None if validation_file is None else str(validation_file),
                text_columns=_split_columns(text_columns), label_column=label_column,
                max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, offline=offline)


@dataclass(frozen=True)
class Torchrun:
    """torchrun's variables for this process; (1, 0, 0, None) for a plain launch."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int | None = None

    @property
    def secondary(self) -> bool:
        """A worker other than rank 0 of a job with several processes."""
        return self.world_size > 1 and self.rank != 0


def torchrun_environment(strict: bool = True) -> Torchrun:
    """Read WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE. A value that is not an integer is a
    RandbpError, or, with `strict=False` (while reporting another error), a plain launch."""
    values = []
    for name, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", None)):
        value = os.environ.get(name)
        try:
            values.append(default if value in (None, "") else int(value))
        except ValueError:
            if not strict:
                return Torchrun()
            raise RandbpError(f"environment variable {name}={value!r} is not an integer") from None
    return Torchrun(*values)


def command_line() -> str:
    """The command as the user would retype it (torchrun's launch reconstructed from its variables)."""
    torchrun = torchrun_environment(strict=False)
    if torchrun.world_size > 1 and torchrun.local_world_size:
        nodes = max(1, torchrun.world_size // max(1, torchrun.local_world_size))
        return shlex.join(["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(torchrun.local_world_size),
                           "-m", "randbp_cli", *sys.argv[1:]])
    return shlex.join(["randbp", *sys.argv[1:]])


def quiet_libraries() -> None:
    """Keep third-party chatter (weight-init warnings, download bars) off our stderr. Importing
    transformers and datasets takes seconds that `report`, `check` and `--help` do not need: they
    read the same settings from the environment when a command imports them (and so do the
    processes a command starts); only those already imported are told directly."""
    # transformers' deprecations, raised from inside transformers and PEFT (PEFT reads
    # `is_gradient_checkpointing`): theirs to resolve, nothing a user of ours can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
    os.environ.update(TRANSFORMERS_VERBOSITY="error", DATASETS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if "transformers" in sys.modules:
        transformers = sys.modules["transformers"]
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        datasets = sys.modules["datasets"]
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def parse_tolerances(peak: str, time: Optional[str], activation: str) -> dict:
    from ..commands.check import parse_tolerance  # when a command judges: not at start-up

    return {"tolerance_peak": parse_tolerance(peak, "--tolerance-peak"),
            "tolerance_time": parse_tolerance(time, "--tolerance-time"),
            "tolerance_activation": parse_tolerance(activation, "--tolerance-activation")}
