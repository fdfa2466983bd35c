"""The graftune command line. Thin: parse, call one library function, print. Errors users can cause print one
line and exit non-zero."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Annotated

import typer

from graftune.config import FEW_PER_CLASS
from graftune.errors import GraftuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Graft small trainable modules onto frozen pre-trained models.")


def _print_version(value: bool) -> None:
    if value:
        from graftune import __version__

        typer.echo(f"graftune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Graft small trainable modules onto frozen pre-trained models; train, compare and serve them on a CPU."""
    # transformers' per-model "Loading weights" bars are noise here (read when transformers is first imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (tests, embedding): switch them off directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


#: notes a command leaves for its end (``_threads``): said on stderr once it has run, dropped when it stops on an error
_NOTES: list[str] = []


def user_errors(fn):
    """GraftuneError -> one line on stderr and exit 2; anything else is a bug and keeps its traceback. Notes left
    in ``_NOTES`` are said after the command, unless it ends on such an error (its one line stays alone)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except GraftuneError as e:
            _NOTES.clear()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except (typer.Exit, KeyboardInterrupt):  # a refusal (exit 1) or Ctrl-C: the notes still explain the run
            _say_notes()
            raise
        except BaseException:  # a bug: its traceback alone
            _NOTES.clear()
            raise
        _say_notes()
        return result

    return wrapper


def _say_notes() -> None:
    for line in _NOTES:
        typer.echo(line, err=True)
    _NOTES.clear()


def _threads(requested: int | None = None, *, flag: bool = False) -> None:
    """torch's CPU threads for a command that computes: ``requested``, or at most the cores other programs leave
    free (``speed/threads.py``; its note is said when the command ends). ``flag``: the command has ``--threads``."""
    from graftune.speed.threads import fit_to_free_cores

    if requested is not None and requested < 1:
        return  # the command refuses it in its own words
    fit_to_free_cores(requested, say=_NOTES.append,
                      choose="--threads N (or OMP_NUM_THREADS=N)" if flag else "OMP_NUM_THREADS=N graftune ...")


@app.command()
@user_errors
def methods(as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects: the adapter "
                                         "methods (\"kind\": \"method\") and train's recipes (\"kind\": "
                                         "\"recipe\").")):
    """List every adaptation method with a one-line description, and the training recipes train also takes."""
    from graftune import list_methods
    from graftune.runs import recipe_rows

    rows, recipe_list = list_methods(), recipe_rows()
    if as_json:
        recipes = [{"name": name, "description": text, "kind": "recipe"} for name, text in recipe_list]
        typer.echo(json.dumps([{**r, "kind": "method"} for r in rows] + recipes, indent=2))
        return
    width = max(len(name) for name in [r["name"] for r in rows] + [name for name, _ in recipe_list])
    for r in rows:
        typer.echo(f"{r['name']:<{width}}  {r['description']}")
    typer.echo("\nrecipes `graftune train --method` also takes:")
    for name, text in recipe_list:
        typer.echo(f"{name:<{width}}  {text}")


# --- train ------------------------------------------------------------------------------------------------------
_TRAIN_HELP = """Train an adapter (or --method head: the head alone) and write the run directory.

\b
Method options: --set key=value, repeatable; values are read as YAML:
  graftune train --model minilm --data bbc-news --method lora --set r=8 --set alpha=16 --shots 16 --out runs/a
A YAML --config file gives any field (see run.yaml in a run directory); flags win over it.

--method contrastive (SetFit: pairs train a LoRA adapter, then a logistic regression; single-label text) takes \
--set iterations, epochs (passes over the pairs), loss, temperature, head_c, embed_max_chunks, r, alpha, \
top_k_layers (docs/low-resource.md).

--method probe (the frozen encoder's whole-text embeddings + a logistic regression, or with --set \
head=prototype the nearest class mean; single-label text) takes --set head, head_c, max_chunks."""


@app.command(help=_TRAIN_HELP)
@user_errors
def train(
    out: str = typer.Option(..., "--out", help="The run directory to write."),
    config: str | None = typer.Option(None, "--config", help="A YAML run config (e.g. another run's run.yaml)."),
    model: str | None = typer.Option(None, help="Base model: an alias (graftune models), a folder or a hub id."),
    data: str | None = typer.Option(None, help="Data: an alias (bbc-news, mnist-5k, json-answers) or a file."),
    method: str | None = typer.Option(None, help="Adaptation method (graftune methods), head, auto: picked by a "
                                      "quick comparison on your training examples, or contrastive: SetFit's pairs "
                                      "train LoRA, then a logistic regression (text), or probe: frozen "
                                      "embeddings + logistic regression or class means (text). With 8-16 "
                                      "labelled texts per class, contrastive was the most accurate on every built-in "
                                      "data set (bench/RESULTS.md).  [default: auto for single-label text with at "
                                      f"most {FEW_PER_CLASS} training examples per class on average and no LoRA "
                                      "settings given (contrastive when a class has a single one), else lora]"),
    sets: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                     help="A method option (repeatable).")] = None,
    task: str | None = typer.Option(None, help="classification, image or causal-lm.  [default: from the data]"),
    shots: int | None = typer.Option(None, help="Training examples per class."),
    seed: int | None = typer.Option(None, help="Seed for splits, shots, init, data order.  [default: 0]"),
    split_seed: int | None = typer.Option(None, help="Seed of the test/val split alone.  [default: --seed]"),
    epochs: int | None = typer.Option(None, help="Passes over the training data.  [default: 10]"),
    lr: float | None = typer.Option(None, help="Adapter learning rate.  [default: 1e-3; contrastive: 3e-3]"),
    head_lr: float | None = typer.Option(None, help="Head learning rate.  [default: lr]"),
    batch_size: int | None = typer.Option(None, help="Examples per optimizer step (contrastive: pairs).  [default: 16; contrastive: 64]"),
    grad_accum: int | None = typer.Option(None, help="Micro-batches per step.  [default: 1]"),
    max_length: int | None = typer.Option(None, help="Tokens per text.  [default: 256]"),
    test: str | None = typer.Option(None, help="A separate test file."),
    test_size: float | None = typer.Option(None, help="Test fraction (or count).  [default: 0.2]"),
    test_per_class: int | None = typer.Option(None, help="Exactly N test examples per class."),
    val_size: float | None = typer.Option(None, help="Val fraction (or count) for early stopping; 0: no val.  "
                                      "[default: 0.1; contrastive, probe, in-context: 0, as they never read it]"),
    text_column: str | None = typer.Option(None, help="The text column of --data and --test.  [default: text]"),
    label_column: str | None = typer.Option(None, help="The label column (several labels per row: a list, or "
                                            "joined by |).  [default: label]"),
    prompt_column: str | None = typer.Option(None, help="The prompt column of causal-LM pairs.  [default: prompt]"),
    response_column: str | None = typer.Option(None, help="The response column of causal-LM pairs.  "
                                               "[default: response]"),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay of the adapter and the head.  "
                                              "[default: 0.01]"),
    warmup: float | None = typer.Option(None, help="Warm-up fraction of the steps.  [default: 0.1]"),
    schedule: str | None = typer.Option(None, help="linear, cosine or constant.  [default: linear]"),
    dropout: float | None = typer.Option(None, help="Dropout before the head.  [default: 0.1]"),
    head_init: str | None = typer.Option(None, help="probe (LP-FT: a logistic-regression start) or random. "
                                         "[default: probe]"),
    base_dropout: bool | None = typer.Option(None, "--base-dropout/--no-base-dropout",
                                             help="Run the frozen base in training mode.  [default: off]"),
    clip: float | None = typer.Option(None, help="Gradient-norm clipping; 0: off.  [default: 1.0]"),
    patience: int | None = typer.Option(None, help="Early-stopping patience in epochs; 0: off.  [default: 5]"),
    metric: str | None = typer.Option(None, help="Val metric: macro_f1, accuracy or loss.  [default: macro_f1]"),
    precision: str | None = typer.Option(None, help="auto, fp32, bf16 or fp16.  [default: auto]"),
    cache: str | None = typer.Option(None, help="Frozen-prefix cache: auto (when only the top layers train, e.g. "
                                     "--set top_k_layers=2), on or off.  [default: auto]"),
    device: str | None = typer.Option(None, help="auto, cpu, cuda or cuda:N.  [default: auto: cuda if available]"),
    compile: bool | None = typer.Option(None, "--compile/--no-compile",
                                        help="torch.compile the layers run every step.  [default: off]"),
    max_new_tokens: int | None = typer.Option(None, help="Generation length for causal-LM tests.  [default: 64]"),
    log_to: str | None = typer.Option(None, help="Also log to mlflow or tensorboard."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
    budget: float | None = typer.Option(None, help="Seconds for --method auto's quick comparison; the pick's own "
                                        "training comes after it.  [default: 300]"),
    init_from: str | None = typer.Option(None, help="Warm start: a run or adapter directory of the same method "
                                         "and shapes; its head too when the labels match."),
    stack_under: str | None = typer.Option(None, help="A run or adapter directory (a language adapter) applied "
                                           "frozen under the trained adapter."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    from graftune.config import build_config, set_flag
    from graftune.runs import default_method, resolve, resume_config
    from graftune.runs import train as run_training

    flags = {"model": model, "data": data, "method": method, "task": task, "shots": shots, "seed": seed,
             "split_seed": split_seed,
             "epochs": epochs, "lr": lr, "head_lr": head_lr, "batch_size": batch_size, "grad_accum": grad_accum,
             "max_length": max_length, "test": test, "test_size": _count_or_fraction(test_size),
             "test_per_class": test_per_class, "val_size": _count_or_fraction(val_size),
             "text_column": text_column, "label_column": label_column, "prompt_column": prompt_column,
             "response_column": response_column, "weight_decay": weight_decay, "warmup": warmup,
             "schedule": schedule, "dropout": dropout, "head_init": head_init, "base_dropout": base_dropout,
             "clip": clip,
             "patience": patience, "metric": metric, "precision": precision, "cache": cache, "device": device,
             "compile": compile, "max_new_tokens": max_new_tokens,
             "log_to": log_to, "threads": threads, "auto_budget": budget, "init_from": init_from,
             "stack_under": stack_under}
    if resume and config is None:
        # the interrupted run's own config; plain words when there is none, or when --method's runs cannot resume
        config = str(resume_config(out, method))
    cfg = build_config(config, sets=sets, out=out, resume=resume or None, overwrite=overwrite or None, **flags)
    _threads(cfg.threads, flag=True)
    why = None
    if method is None and config is None:  # nobody named a method: graftune's default for this data
        cfg, why = default_method(cfg)  # said with the results: a run that fails says one line, its error
    if budget is not None and cfg.method != "auto":  # given, but nothing would read it
        from graftune.errors import ConfigError

        if method is not None or config is not None:
            raise ConfigError(f"--budget bounds --method auto's comparison; --method {cfg.method} compares nothing: "
                              "drop --budget, or pass --method auto")
        why_not = ("a class has a single training example, too few for auto's folds" if cfg.method != "lora" else
                   f"the data is not single-label text with at most {FEW_PER_CLASS} training examples a class, "
                   "or did not load")
        raise ConfigError(f"--budget bounds --method auto's comparison; without --method this run trains "
                          f"{cfg.method} ({why_not}), which compares nothing: drop --budget")
    picked = cfg.method == "auto"
    try:  # Ctrl-C anywhere from here (auto's comparison included) is one line, not a traceback
        cfg = resolve(cfg, progress=not (quiet or as_json))  # checked before anything loads; auto picks here
        if picked:
            chosen = cfg.auto["method"]
            how = "" if chosen == cfg.method else f" (trained as --method {cfg.method}" + "".join(
                " " + set_flag(k, v) for k, v in cfg.options.items()) + ")"
            default = " (the default here: no --method given)" if why else ""
            typer.echo(f"--method auto{default} picked {chosen}{how}. {cfg.auto['reason']}", err=as_json)
        metrics = run_training(cfg, progress=not quiet)
        # this invocation's comparison (a run.yaml given with --config keeps the record of an old one)
        compared = cfg.auto.get("seconds") if picked else None
    except KeyboardInterrupt:
        import shlex

        from graftune.run.checkpoint import checkpoint_file
        from graftune.run.rundir import partial_dir

        if checkpoint_file(partial_dir(out)).is_file():
            typer.echo(f"\ninterrupted; continue with: graftune train --resume --out {shlex.quote(out)}", err=True)
        else:
            typer.echo("\ninterrupted before the first checkpoint; nothing was written", err=True)
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") != "0":
        return  # one of several processes (torchrun): rank 0 reports
    if why:
        typer.echo(why, err=as_json)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    typer.echo(_summary(metrics, compared))
    typer.echo(f"run written to {out.rstrip('/') or '/'}/")


def _count_or_fraction(value: float | None):
    """--test-size 100 means 100 examples, --test-size 0.2 a fraction."""
    return int(value) if value is not None and value >= 1 and float(value).is_integer() else value


def _size(n: int) -> str:
    """Bytes as MB, or as kB under 0.1 MB (a probe's head is a few kB: "0.00 MB" said nothing)."""
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _summary(m: dict, compared: float | None = None) -> str:
    """The run's result in a few lines; ``compared``: the seconds of auto's comparison before it, when it ran."""
    from graftune.tasks.classification import format_accuracy

    if m.get("task") == "causal-lm":
        keys = ("perplexity", "exact_match", "json_valid_rate", "json_match_rate")
    else:
        keys = ("accuracy", "macro_f1")
    shown = ", ".join(format_accuracy(m) if k == "accuracy" else f"{k} {m[k]:.3f}" for k in keys if k in m)
    saved = [f"{name} {_size(m[key])}" for name, key in (("adapter", "adapter_bytes"), ("head", "head_bytes"))
             if m.get(key)]  # a probe run has no adapter; contrastive and probe runs keep their head apart
    after = f" after auto's {compared:.1f} s comparison" if compared is not None else ""
    line = (f"test: {shown} ({m.get('examples', 0)} examples); trained {m['trainable_params']:,} of "
            f"{m['total_params']:,} params in {m['train_seconds']:.0f} s{after}; "
            f"{', '.join(saved) or 'nothing saved'}")
    for note in m.get("notes", []):
        line += f"\nnote: {note}"
    for warning in m.get("warnings", []):
        line += f"\nWARNING: {warning}"
    if m.get("stopped_early"):
        line += (f"\nearly stopping ended the run after epoch {m['epochs_run']} of {m['epochs']}; the best epoch on "
                 f"val, {m['best_epoch']}, was restored")
    elif m.get("best_epoch") and m.get("best_epoch") != m.get("epochs_run"):
        line += f"\nthe best epoch on val, {m['best_epoch']} of {m['epochs_run']}, was restored"
    return line


# --- compare ------------------------------------------------------------------------------------------------------
_AUGMENT = {"off": (False,), "on": (True,), "both": (False, True)}
_GROUP_HELP = ("A column of the scored file naming each example's group: accuracy and macro-F1 per group and the "
               "largest gap (bias). Read from CSV/JSONL/Parquet files; built-in aliases and class folders have no "
               "columns.")


@app.command()
@user_errors
def compare(
    model: str = typer.Option(..., help="Base model: an alias (graftune models), a folder or a hub id."),
    data: str = typer.Option(..., help="Data: an alias (bbc-news, mnist-5k) or a file/folder of labelled examples."),
    out: str = typer.Option(..., "--out", help="The folder for results.json and report.html."),
    shots: str | None = typer.Option(None, help="Training examples per class, comma-separated.  [default: 8,16,64, "
                                     "those the data has room for beside a test set]"),
    seeds: int = typer.Option(3, help="Shot draws per shot count (seeds 0..N-1)."),
    strategies: str | None = typer.Option(None, help="Comma-separated subset of linear-probe, prototypes, "
                                          "contrastive, lora-top2, ia3, lora, bottleneck, prefix, topk, full, "
                                          "in-context (SmolLM2 prompted with labelled examples; only when named). "
                                          "[default: all but in-context]"),
    augment: str = typer.Option("both", help="off, on or both: runs without and/or with augmented training data."),
    budget: float | None = typer.Option(None, help="Wall-time bound in seconds (positive); runs that would not fit "
                                        "are skipped and listed."),
    test: str | None = typer.Option(None, help="A separate test file (else a test set is carved once)."),
    test_per_class: int | None = typer.Option(None, help="Test examples per class.  [default: up to 100]"),
    text_column: str = typer.Option("text", help="The text column of --data and --test."),
    label_column: str = typer.Option("label", help="The label column of --data and --test."),
    sets: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="A training setting for the adapter "
                                                   "strategies (epochs, lr, max_length, ...; repeatable).")] = None,
    group_column: str | None = typer.Option(None, help=_GROUP_HELP + " Per run of every strategy (the "
                                            "test examples' groups: from --test, else from --data)."),
    robustness: bool = typer.Option(False, "--robustness", help="Also measure each run's accuracy under character "
                                    "noise, word drops and swaps and case changes, and a greedy character attack's "
                                    "success rate (graftune robustness; text data, every strategy)."),
    robustness_sample: int = typer.Option(100, help="Test examples --robustness scores (seeded, the same for every "
                                          "run)."),
    attack_sample: int = typer.Option(20, help="Texts --robustness attacks at most per run (correctly classified "
                                      "ones of the sample)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is an earlier comparison's "
                                   "folder (or empty); any other folder or file is refused."),
):
    """Compare adaptation strategies on identical splits (shots x seeds x augmentation); write results.json and
    report.html, print the summary and a recommendation. With --group-column and --robustness, also per-group gaps
    and robustness per run."""
    _threads()
    from graftune.config import parse_sets
    from graftune.errors import ConfigError
    from graftune.strategies.compare import TrustOptions, run_compare
    from graftune.strategies.summary import format_summary, recommend, summarize

    if augment not in _AUGMENT:
        raise ConfigError(f"--augment {augment!r}: use off, on or both")
    names = None if strategies is None else [n.strip() for n in strategies.split(",") if n.strip()]
    note = None
    if shots is None:  # the defaults, as many as the data has room for (a small file still gets a comparison)
        from graftune.strategies.catalog import fitting_shots, load_compare_data

        ds, user_test = load_compare_data(data, test, text_column, label_column)
        counts, note = fitting_shots(ds, [8, 16, 64], 0 if user_test is not None else test_per_class or 2)
        shots = ",".join(map(str, counts))
    rows = run_compare(model, data, shots=_int_list(shots, "--shots"), seeds=seeds, strategies=names,
                       augment=_AUGMENT[augment], budget_s=budget, out_dir=out, text_column=text_column,
                       label_column=label_column, test=test, test_per_class=test_per_class,
                       settings=parse_sets(sets), progress=not quiet, overwrite=overwrite,
                       trust=TrustOptions(group_column=group_column, robustness=robustness, sample=robustness_sample,
                                          attack_sample=attack_sample))
    summary = summarize(rows)
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        warnings = json.load(f)["meta"].get("warnings", [])
    if note:  # after the run: a refused comparison prints its one error line only
        typer.echo(f"note: {note}")
    for warning in warnings:
        typer.echo(f"WARNING: {warning}")
    typer.echo(format_summary(summary, rows))
    typer.echo("")
    for line in recommend(summary):
        typer.echo(line)
    typer.echo(f"\nresults: {os.path.join(out, 'results.json')}\nreport:  {os.path.join(out, 'report.html')}")


@app.command()
@user_errors
def bench(
    data: str = typer.Option("bbc-news,trec,rotten-tomatoes,sms-spam,convention-2012,digits",
                             help="Comma-separated data sets: aliases or files of labelled examples."),
    out: str = typer.Option("bench-results", "--out", help="The folder for bench.json, bench.html and bench.md."),
    shots: str = typer.Option("8,16", help="Training examples per class, comma-separated."),
    seeds: int = typer.Option(3, help="Shot draws per shot count (seeds 0..N-1)."),
    strategies: str = typer.Option("linear-probe,prototypes,contrastive,lora", help="Comma-separated strategies "
                                   "of graftune compare, or all."),
    no_auto: bool = typer.Option(False, "--no-auto", help="Leave out --method auto (it runs by default, judged by "
                                 "its regret)."),
    auto_budget: float = typer.Option(300.0, help="auto's selection budget in seconds (train --method auto's "
                                      "default)."),
    budget: float | None = typer.Option(None, help="Seconds per data set; jobs that would not fit are skipped and "
                                        "listed."),
    model: str = typer.Option("minilm", help="Base model for text data sets."),
    image_model: str = typer.Option("efficientnet-lite0", help="Base model for image data sets."),
    ray: str | None = typer.Option(None, "--ray", metavar="ADDRESS", help="Run the jobs as Ray tasks: local (a "
                                   "Ray instance on this machine), ray://HOST:10001 or a cluster address "
                                   "(docs/bench.md)."),
    text_column: str = typer.Option("text", help="The text column of data files."),
    label_column: str = typer.Option("label", help="The label column of data files."),
    sets: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="A training setting for the adapter strategies and auto "
                                                   "(epochs, lr, max_length, ...; repeatable).")] = None,
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if an earlier bench wrote it (or it is "
                                   "empty)."),
):
    """Run the comparison on several data sets (shots x seeds, each (data set, strategy, shots, seed) an
    independent job, locally or on Ray) with --method auto judged by its regret; write bench.json, bench.html
    and bench.md (docs/bench.md)."""
    _threads()
    from graftune.config import parse_sets
    from graftune.strategies.bench import run_bench

    summary = run_bench([d.strip() for d in data.split(",")], out_dir=out, shots=_int_list(shots, "--shots"),
                        seeds=seeds, strategies=[n.strip() for n in strategies.split(",") if n.strip()],
                        with_auto=not no_auto, auto_budget=auto_budget, budget_s=budget,
                        models={"text": model, "image": image_model}, settings=parse_sets(sets), ray_address=ray,
                        text_column=text_column, label_column=label_column, overwrite=overwrite, progress=not quiet,
                        command="graftune " + " ".join(sys.argv[1:]))
    with open(os.path.join(out, "bench.md"), encoding="utf-8") as f:
        typer.echo(f.read())
    o = summary["overall"]
    if o["mean_regret"] is not None:
        typer.echo(f"auto's mean regret: {100 * o['mean_regret']:.1f} points")
    typer.echo(f"results: {os.path.join(out, 'bench.json')}\nreport:  {os.path.join(out, 'bench.html')}\n"
               f"table:   {os.path.join(out, 'bench.md')}")


def _int_list(value: str, flag: str) -> list[int]:
    """'8,16,64' -> [8, 16, 64]; anything else is a one-line error."""
    from graftune.errors import ConfigError

    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"{flag} {value!r}: use positive whole numbers separated by commas, e.g. 8,16,64")
    return [int(p) for p in parts]


# --- eval, predict, generate ------------------------------------------------------------------------------------
_QUANTIZE_HELP = ("none or int8: the base's Linear layers as int8 for faster CPU inference (runs whose adapters "
                  "merge: LoRA, IA3, BitFit, head; docs/speed.md).")


@app.command("eval")
@user_errors
def eval_(
    run_dir: str = typer.Argument(..., help="A run directory written by graftune train."),
    data: str | None = typer.Option(None, help="Data to score (every example).  [default: the run's test split]"),
    text_column: str | None = typer.Option(None, help="The text column of --data.  [default: the run's]"),
    label_column: str | None = typer.Option(None, help="The label column of --data.  [default: the run's]"),
    prompt_column: str | None = typer.Option(None, help="The prompt column of --data.  [default: the run's]"),
    response_column: str | None = typer.Option(None, help="The response column of --data.  [default: the run's]"),
    batch_size: int = typer.Option(32, min=1, help="Examples per forward pass."),
    quantize: str = typer.Option("none", help=_QUANTIZE_HELP),
    group_column: str | None = typer.Option(None, help=_GROUP_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    """Score a run: accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (classification),
    or perplexity, exact match and JSON validity (causal LM); with --group-column, per group too."""
    _threads()
    from graftune.evaluate import evaluate_run
    from graftune.io.onnx_format import is_onnx_export

    if is_onnx_export(run_dir):  # a `graftune export --format onnx` folder: scored with onnxruntime
        if group_column is not None:
            from graftune.errors import ConfigError

            raise ConfigError("--group-column: not for an ONNX export; eval the run directory it was exported from")
        from graftune.onnx_export import evaluate_export

        m = evaluate_export(run_dir, data=data, text_column=text_column, label_column=label_column,
                            batch_size=batch_size, quantize=quantize)
        typer.echo(json.dumps(m, indent=2) if as_json else _metrics_text(m))
        return
    m = evaluate_run(run_dir, data=data, text_column=text_column, label_column=label_column,
                     prompt_column=prompt_column, response_column=response_column, batch_size=batch_size,
                     quantize=quantize, group_column=group_column)
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(_metrics_text(m))
    if "groups" in m:
        from graftune.run.scoring import format_groups

        typer.echo(f"\nper group ({m['groups']['column']})\n" + format_groups(m["groups"]))


def _metrics_text(m: dict) -> str:
    if "perplexity" in m:
        lines = [f"examples {m.get('examples', '-')}, perplexity {m['perplexity']:.3f}"]
        lines += [f"{k} {m[k]:.3f}" for k in ("exact_match", "json_valid_rate", "json_match_rate") if k in m]
        return "\n".join(lines)
    from graftune.tasks.classification import format_accuracy

    names = m["label_names"]
    width = max(12, *(len(n) for n in names))
    lines = [f"{format_accuracy(m)}  macro-F1 {m['macro_f1']:.3f}  ({m['examples']} examples)", "",
             f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
    for n in names:
        c = m["per_class"][n]
        lines.append(f"{n:<{width}} {c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>6.3f} {c['support']:>8}")
    cm = m["confusion_matrix"]
    if isinstance(cm, list):
        # columns headed by the class names cut to 12 characters ("entertainmen"), or by the rows' numbers where
        # that would leave two alike or one blank
        heads = [n[:12] for n in names]
        rows = names
        if len(set(heads)) < len(heads) or not all(h.strip() for h in heads):
            heads = [str(j + 1) for j in range(len(names))]
            rows = [f"{j + 1} {n}" for j, n in enumerate(names)]
            width = max(width, *(len(r) for r in rows))
        cols = [max(len(h), *(len(str(row[j])) for row in cm)) for j, h in enumerate(heads)]
        lines += ["", "confusion matrix (rows: true, columns: predicted)",
                  f"{'':<{width}} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, cols))]
        lines += [f"{n:<{width}} " + " ".join(f"{v:>{w}}" for v, w in zip(row, cols)) for n, row in zip(rows, cm)]
    lines += [f"WARNING: {warning}" for warning in m.get("warnings", [])]
    return "\n".join(lines)


@app.command()
@user_errors
def predict(
    run_dir: str = typer.Argument(..., help="A classification run directory."),
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify (image files for image runs).")] = None,
    input_file: str | None = typer.Option(None, "--input", help="A .txt (one text per line; blank lines skipped), "
                                          ".csv, .tsv, .jsonl, .json or .parquet file; for image runs image files "
                                          "or a folder of them."),
    text_column: str | None = typer.Option(None, help="The text column of a --input file of records.  [default: "
                                           "the run's own text column, else text]"),
    quantize: str = typer.Option("none", help=_QUANTIZE_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line: where the input came from "
                                 "(arg N, or line N of --input) and its text, the label and the probabilities."),
):
    """Classify texts with a trained run (or an ONNX export of one): the label and the probability of every class.
    Each output row starts with the input it answers: arg N (the N-th text given), line N of --input, or the
    image file's name."""
    _threads()
    from graftune.data.inputs import read_input_file
    from graftune.errors import DataError
    from graftune.io.onnx_format import is_onnx_export
    from graftune.runs import run_text_column

    if not texts and not input_file:
        raise DataError("nothing to predict: pass texts after RUN_DIR or --input FILE")
    blank = [i for i, t in enumerate(texts or [], 1) if not t.strip()]
    if blank:
        raise DataError(f"arg {blank[0]} is blank; pass a text to classify (or leave it out)")
    if input_file:  # read and checked before any model loads
        given = read_input_file(input_file, text_column=text_column or run_text_column(run_dir))
    else:
        given = None
    texts = list(texts or [])
    if is_onnx_export(run_dir):  # a `graftune export --format onnx` folder: run with onnxruntime
        from graftune.onnx_export import predict_export

        rows, images = predict_export(run_dir, texts, given, quantize=quantize)
        _print_predictions(rows, [{"arg": i, "file" if images else "text": t} for i, t in enumerate(texts, 1)], given,
                           as_json)
        return
    from graftune.evaluate import predict as run_predict
    from graftune.evaluate import read_image
    from graftune.runs import load_run

    run = load_run(run_dir, expect="classifier", quantize=quantize)
    images = run.kind == "image"
    if given is not None and given.images != images:
        raise DataError(f"{input_file} holds images, but this run classifies text: {_TEXT_INPUTS}" if given.images
                        else f"{input_file} is a text file, but this run classifies images: pass image files or a "
                        "folder of them")
    inputs = [read_image(t) for t in texts] if images else texts
    sources = [{"arg": i, "file" if images else "text": t} for i, t in enumerate(texts, 1)]
    _print_predictions(run_predict(run, inputs + (given.items if given else [])), sources, given, as_json)


_TEXT_INPUTS = "pass a .txt (one text per line), .csv, .jsonl, .json or .parquet file"


def _print_predictions(rows: list[dict], sources: list[dict], given, as_json: bool) -> None:
    """One line per prediction, starting with the input it answers: the positional inputs' ``sources``, then
    those of the ``--input`` file ``given`` (a ``data.inputs.Inputs``, or None; its skipped blank lines are
    noted on stderr first)."""
    if given is not None and given.note():
        typer.echo(f"note: {given.note()}", err=True)
    for row, source in zip(rows, sources + (given.sources if given else []), strict=True):
        if as_json:
            typer.echo(json.dumps({**source, **row}))
            continue
        where = next((f"{kind} {source[kind]}" for kind in ("arg", "line", "record", "row") if kind in source),
                     source.get("file"))
        label = row.get("label") or ",".join(row.get("labels", [])) or "-"
        text = source.get("text")
        preview = "" if text is None else "  " + " ".join(text.split())[:70]
        if text is None and source.get("file") not in (None, where):  # an image given as an argument: its file
            preview = f"  {source['file']}"
        typer.echo(f"{where}\t{label}\t{max(row['probabilities'].values()):.3f}{preview}")


@app.command()
@user_errors
def generate(
    run_dir: Annotated[str, typer.Argument(help="A causal-LM run directory.")],
    prompts: Annotated[list[str], typer.Argument(help="Prompts to answer.")],
    max_new_tokens: int | None = typer.Option(None, min=1, help="Tokens to generate per answer.  "
                                              "[default: the run's max_new_tokens]"),
    quantize: str = typer.Option("none", help=_QUANTIZE_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line: prompt and answer."),
):
    """Answer prompts with a causal-LM run (greedy decoding)."""
    _threads()
    from graftune.evaluate import generate as run_generate
    from graftune.runs import load_run

    run = load_run(run_dir, expect="causal-lm", quantize=quantize)
    for prompt, answer in zip(prompts, run_generate(run, prompts, max_new_tokens=max_new_tokens)):
        typer.echo(json.dumps({"prompt": prompt, "answer": answer}) if as_json else answer)


# --- models, export, demo -----------------------------------------------------------------------------------------
@app.command()
@user_errors
def models(as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects.")):
    """List the built-in base models: size, tasks, license, and the package that ships them."""
    from dataclasses import asdict

    from graftune.zoo import list_models

    rows = [asdict(m) for m in list_models()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["alias"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['alias']:<{width}}  {r['params_m']:>6.1f}M params  {r['size_mb']:>6.1f} MB  "
                   f"{', '.join(r['tasks']):<40} {r['license']:<11} pip install {r['package']}")


@app.command()
@user_errors
def export(
    run_dir: str = typer.Argument(..., help="A run directory."),
    out: str = typer.Option(..., "--out", help="The directory to write."),
    fmt: str = typer.Option("peft", "--format", help="peft (LoRA runs): adapter_config.json + safetensors; onnx "
                            "(text and image classifiers whose adapters merge): one ONNX graph + tokenizer or "
                            "image preprocessing, for onnxruntime."),
    quantize: str = typer.Option("none", help="onnx: none or int8 (text: dynamic int8 weights; images: static int8 "
                                 "calibrated on the training images; prints the accuracy change on the run's test "
                                 "split)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="onnx: replace an earlier ONNX export at --out."),
):
    """Export a run: its adapter in PEFT's format (LoRA), or the whole classifier, adapters merged, as ONNX
    (checked against PyTorch's logits; run it with graftune predict/eval OUT_DIR or any onnxruntime)."""
    _threads()
    from graftune.errors import ConfigError
    from graftune.io.peft_format import export_run

    if fmt == "onnx":
        from graftune.onnx_export import export_onnx, format_report

        result = export_onnx(run_dir, out, quantize=quantize, overwrite=overwrite,
                             log=lambda msg: typer.echo(msg, err=True))
        typer.echo(format_report(result))
        return
    if fmt != "peft":
        raise ConfigError(f"--format {fmt!r}: the supported formats are peft and onnx")
    if quantize != "none" or overwrite:
        raise ConfigError("--quantize and --overwrite apply to --format onnx (a PEFT export replaces an earlier "
                          "PEFT export at --out)")
    path = export_run(run_dir, out)
    typer.echo(f"PEFT adapter written to {path}/")


@app.command()
@user_errors
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Where to keep the demo's run directory."),
    seed: int = typer.Option(0, min=0, help="Seed of the split and the training."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """The main job: --method auto on 8 TREC questions per class, its evidence and pick, against the frozen
    baseline."""
    _threads()
    from graftune.demo import format_table, run_demo

    typer.echo("MiniLM on TREC question types, 8 labelled questions per class: --method auto picks how to adapt it, "
               "then the pick is scored on 300 held-out questions next to the frozen-encoder baseline...")
    typer.echo(format_table(run_demo(out, seed=seed, progress=not quiet)))


# --- graftune registry: versions, the regression gate, rollback (src/graftune/registry/) ------------------------
registry_app = typer.Typer(no_args_is_help=True, help="Versioned, hashed run directories; a regression gate on "
                           "promote; rollback; an audit log. `--registry DIR`, else $GRAFTUNE_REGISTRY, else a "
                           "folder in the user's data dir.")
app.add_typer(registry_app, name="registry")
RegistryDir = Annotated[str | None, typer.Option("--registry", help="The registry folder.  [default: "
                                                 "$GRAFTUNE_REGISTRY, else the user's data dir]")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Mlflow = Annotated[str | None, typer.Option("--mlflow", help="Also mirror to this MLflow tracking URI (needs mlflow "
                                            "installed).")]


def _registry(path: str | None, mlflow: str | None = None):
    from graftune.registry import open_registry
    from graftune.registry.mirror import check_mlflow

    check_mlflow(mlflow)
    return open_registry(path)


@registry_app.command("push")
@user_errors
def registry_push(run_dir: str = typer.Argument(..., help="A run directory (graftune train --out)."),
                  name: str = typer.Option(..., "--name", help="The name to add a version to."),
                  registry: RegistryDir = None, as_json: AsJson = False, mlflow: Mlflow = None):
    """Store RUN_DIR as the next immutable version of NAME (files hashed; log and checkpoints left out)."""
    from graftune.registry.mirror import mirror_version
    from graftune.registry.text import as_json as dumps
    from graftune.registry.text import headline

    reg = _registry(registry, mlflow)
    v = reg.push(run_dir, name)
    mirror_version(mlflow, v)
    typer.echo(dumps(v.to_dict()) if as_json else f"pushed {v.ref}: {headline(v)} ({v.path})")


@registry_app.command("list")
@user_errors
def registry_list(name: str | None = typer.Argument(None, help="Only this name's versions."),
                  registry: RegistryDir = None, as_json: AsJson = False):
    """Every version, the promoted ones marked with *."""
    from graftune.registry.text import as_json as dumps
    from graftune.registry.text import version_table

    reg = _registry(registry)
    versions, promoted = reg.list(name), reg.promoted()
    if as_json:
        typer.echo(dumps([v.to_dict() | {"promoted": getattr(promoted.get(v.name), "version", None) == v.version}
                          for v in versions]))
    else:
        typer.echo("\n".join(version_table(versions, promoted)))


@registry_app.command("show")
@user_errors
def registry_show(ref: str = typer.Argument(..., help="NAME (its versions and log) or NAME@V (one version)."),
                  registry: RegistryDir = None, as_json: AsJson = False):
    """One version (files re-hashed: a changed file is refused), or a name's versions and audit log."""
    from graftune.registry import parse_ref
    from graftune.registry.text import as_json as dumps
    from graftune.registry.text import show_name, version_details

    reg = _registry(registry)
    name, number = parse_ref(ref)
    promoted = reg.promoted_version(name)
    if number is None:  # the overview flags a damaged version (list's quick check) instead of refusing the name
        versions = reg.list(name)
        if not versions:
            reg.show(name)  # raises the one-line "no versions of NAME"
        if as_json:
            typer.echo(dumps({"name": name, "promoted": promoted, "versions": [x.to_dict() for x in versions],
                              "log": reg.log(name)}))
        else:
            typer.echo("\n".join(show_name(reg, name, versions)))
        return
    v = reg.show(name, number)
    log = [e for e in reg.log(name) if e["version"] == number]
    if as_json:
        typer.echo(dumps(v.to_dict() | {"promoted": promoted == number, "log": log}))
    else:
        from graftune.registry.text import log_lines

        typer.echo("\n".join(version_details(v, promoted=promoted == number) + ["  log:"]
                             + [f"    {line}" for line in log_lines(log)]))


@registry_app.command("promote")
@user_errors
def registry_promote(ref: str = typer.Argument(..., help="NAME@V to promote."),
                     data: str | None = typer.Option(None, "--data", help="Held-out data to gate on.  [default: the "
                                                     "candidate's test split recorded at push]"),
                     force: bool = typer.Option(False, "--force", help="Promote even if the gate refuses (needs "
                                                "--reason; recorded)."),
                     reason: str | None = typer.Option(None, "--reason", help="Why (recorded in the audit log)."),
                     alpha: float = typer.Option(0.05, "--alpha", help="The gate's one-sided significance level: "
                                                 "its false-refusal rate for an equally good candidate."),
                     text_column: str | None = typer.Option(None, help="The --data file's text column.  [default: "
                                                            "the run's]"),
                     label_column: str | None = typer.Option(None, help="The --data file's label column.  [default: "
                                                             "the run's]"),
                     registry: RegistryDir = None, as_json: AsJson = False, mlflow: Mlflow = None):
    """Promote NAME@V through the regression gate (exit 1 when refused: the candidate is worse than the promoted
    version beyond sampling noise)."""
    _threads()
    from graftune.errors import ConfigError
    from graftune.registry import parse_ref
    from graftune.registry.mirror import mirror_alias
    from graftune.registry.text import as_json as dumps

    name, number = parse_ref(ref)
    if number is None:
        raise ConfigError(f"promote needs a version: {name}@N (`graftune registry show {name}` lists them)")
    reg = _registry(registry, mlflow)
    result = reg.promote(name, number, data=data, force=force, reason=reason, alpha=alpha, text_column=text_column,
                         label_column=label_column)
    if result.accepted:
        mirror_alias(mlflow, reg.show(name, number))
    typer.echo(dumps(result.to_dict()) if as_json else result.message)
    for note in [] if as_json else result.notes:
        typer.echo(f"note: {note}")
    if not result.accepted:
        raise typer.Exit(1)


@registry_app.command("rollback")
@user_errors
def registry_rollback(name: str = typer.Argument(..., help="The name to roll back."),
                      registry: RegistryDir = None, mlflow: Mlflow = None):
    """Promote again the version that was promoted before the current one."""
    from graftune.registry.mirror import mirror_alias

    reg = _registry(registry, mlflow)
    before = reg.promoted_version(name)
    v = reg.rollback(name)
    mirror_alias(mlflow, v)
    typer.echo(f"{name}: rolled back from @{before} to {v.ref}")


@registry_app.command("delete")
@user_errors
def registry_delete(ref: str = typer.Argument(..., help="NAME@V to delete (the promoted one only when damaged)."),
                    registry: RegistryDir = None):
    """Delete one version (its number is never reused)."""
    from graftune.errors import ConfigError
    from graftune.registry import parse_ref

    name, number = parse_ref(ref)
    if number is None:
        raise ConfigError(f"delete needs a version: {name}@N (one version at a time)")
    reg = _registry(registry)
    was = reg.promoted_version(name)
    after = reg.delete(name, number)
    typer.echo(f"deleted {name}@{number}")
    if was == number:  # only a damaged promoted version can be deleted
        typer.echo(f"note: {name}@{number} was the promoted (damaged) version; "
                   + (f"{after.ref} is promoted again" if after else f"{name} has no promoted version now"))


@registry_app.command("log")
@user_errors
def registry_log(name: str | None = typer.Argument(None, help="Only this name's entries."),
                 registry: RegistryDir = None, as_json: AsJson = False):
    """The audit log: every push, promote (forced or not), refusal, rollback and delete, with who and when."""
    from graftune.registry.text import as_json as dumps
    from graftune.registry.text import log_lines

    entries = _registry(registry).log(name)
    typer.echo(dumps(entries) if as_json else "\n".join(log_lines(entries)))
# --- end of graftune registry ------------------------------------------------------------------------------------


# --- serve and drift (graftune.serve) ---------------------------------------------------------------------------
@app.command()
@user_errors
def serve(
    registry: str | None = typer.Option(None, "--registry", help="The registry whose promoted versions are served.  "
                                        "[default: $GRAFTUNE_REGISTRY, else the user data folder]"),
    runs: Annotated[list[str] | None, typer.Option("--run", metavar="NAME=RUN_DIR",
                                                   help="Also serve a run directory as it is "
                                                   "(repeatable; without --registry only these).")] = None,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8000, help="Port."),
    max_batch: int = typer.Option(32, help="Rows per forward at most (1: one request per forward)."),
    max_wait_ms: float = typer.Option(5.0, help="Batching window: how long a request waits for company."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="GRAFTUNE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' (or X-API-Key) on every endpoint "
                                       "but /health."),
    drift_dir: str | None = typer.Option(None, help="Where served-input summaries are written.  [default: "
                                         "<registry>-drift next to the registry; graftune-drift in the working "
                                         "folder with --run only]"),
    drift_bucket: str = typer.Option("1h", help="Width of a drift summary's time bucket (30m, 1h, ...): the finest "
                                     "`graftune drift --since` can cut."),
    drift_keep: str = typer.Option("7d", help="Drift buckets older than this are deleted."),
    poll: float = typer.Option(1.0, help="Seconds between registry checks (promote/rollback are followed)."),
    max_inputs: int = typer.Option(64, help="Texts per request at most."),
    max_chars: int = typer.Option(20_000, help="Characters per text at most."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
):
    """Serve every promoted adapter from one base per base model: POST /v1/predict, /v1/generate; GET /v1/adapters,
    /health, /metrics. Requests for different adapters share one forward (docs/deploy.md)."""
    from graftune.serve.schemas import Limits
    from graftune.serve.server import serve as run_server

    run_server(registry=registry, runs=runs or [], host=host, port=port, max_batch=max_batch,
               max_wait_ms=max_wait_ms, api_key=api_key, drift_dir=drift_dir, poll_s=poll,
               limits=Limits(max_inputs=max_inputs, max_chars=max_chars), threads=threads, log_level=log_level,
               drift_bucket=drift_bucket, drift_keep=drift_keep)


@app.command()
@user_errors
def drift(
    name: str = typer.Argument(..., help="The served name."),
    registry: str | None = typer.Option(None, "--registry", help="The registry.  [default: $GRAFTUNE_REGISTRY, else "
                                        "the user data folder]"),
    version: int | None = typer.Option(None, help="The version.  [default: the promoted one]"),
    run: str | None = typer.Option(None, "--run", help="A run directory served with --run NAME=RUN_DIR instead of "
                                   "a registry version."),
    drift_dir: str | None = typer.Option(None, help="The server's --drift-dir.  [default: <registry>-drift; "
                                         "graftune-drift with --run]"),
    alpha: float = typer.Option(0.01, help="False-alarm rate of the whole test (Bonferroni over its checks)."),
    split: str = typer.Option("train", help="The reference: the version's train, val or test split."),
    since: str | None = typer.Option(None, "--since", help="Judge the inputs served in the last DURATION (30m, 6h, "
                                     "7d; whole buckets of the server's --drift-bucket).  [default: 24h]"),
    last: int | None = typer.Option(None, "--last", help="Judge the newest buckets holding at least N inputs, "
                                    "however old."),
    everything: bool = typer.Option(False, "--all", help="Judge every input kept (the server keeps --drift-keep)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Do recent inputs of a served adapter still look like its training data? Embedding, text length,
    unknown-token rate and predicted-class shares of the last 24 hours (--since, --last, --all), each tested at a
    stated false-alarm rate."""
    _threads()
    from graftune.serve.server import check_drift

    report = check_drift(name, registry=registry, run=run, version=version, drift_dir=drift_dir, alpha=alpha,
                         split=split, since=since, last=last, everything=everything)
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2) if as_json else report["text"])


# --- check and robustness: can the data and the model be trusted (data/checks.py, strategies/label_check.py,
# strategies/robustness.py; docs/trust.md) -------------------------------------------------------------------------
@app.command()
@user_errors
def check(
    data: str | None = typer.Argument(None, help="Data to check: an alias (bbc-news) or a file/folder of labelled "
                                      "examples, read as it is (no duplicate or empty text dropped)."),
    data_flag: str | None = typer.Option(None, "--data", help="DATA, named as train names it."),
    test: str | None = typer.Option(None, "--test", help="A test file to check against DATA: a test example that is "
                                    "also a training example is a leak."),
    labels: bool = typer.Option(False, "--labels", help="Also list suspect labels: out-of-fold predictions from the "
                                "frozen --model's embeddings contradict them (text; embeds every text)."),
    model: str = typer.Option("minilm", help="The frozen encoder of --labels (and its tokenizer's token counts)."),
    text_column: str = typer.Option("text", help="The text column of DATA and --test."),
    label_column: str = typer.Option("label", help="The label column of DATA and --test."),
    top: int = typer.Option(10, min=0, help="Suspect labels shown (--json lists them all)."),
    min_score: float = typer.Option(0.0, min=0.0, max=1.0, help="List only suspects scoring at least this "
                                    "(p(suggested) - p(given)); 0: every disagreement."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a problem is found (for scripts and CI)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
):
    """Check data before training on it: exact and near-duplicate examples, the same example under different
    labels, class imbalance, empty or very long texts, a test set that overlaps the data, and (--labels) suspect
    labels. Reads only; writes nothing."""
    _threads()
    from graftune.data.checks import format_report
    from graftune.errors import ConfigError
    from graftune.strategies.label_check import check_source

    if (data is None) == (data_flag is None):
        raise ConfigError("check: name the data once: graftune check FILE (or --data FILE)")
    data = data or data_flag
    report = check_source(data, test=test, labels=labels, model=model, text_column=text_column,
                          label_column=label_column, min_score=min_score)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report, top=top))
    if strict and report["problems"]:
        raise typer.Exit(1)


@app.command("robustness")
@user_errors
def robustness_(
    run_dir: str = typer.Argument(..., help="A text-classification run directory (graftune train --out)."),
    data: str | None = typer.Option(None, help="Data to score (every example).  [default: the run's test split]"),
    strengths: str = typer.Option("0.05,0.1,0.2", help="Perturbation strengths in (0, 1], comma-separated: the "
                                  "fraction of characters or words touched."),
    sample: int | None = typer.Option(None, min=1, help="Score at most N examples (seeded).  [default: all]"),
    budget: int = typer.Option(10, min=0, help="Character edits the attack may make per text; 0: no attack."),
    attack_sample: int = typer.Option(40, min=1, help="Texts attacked at most (correctly classified ones)."),
    scan_words: int = typer.Option(64, min=1, help="Words the attack ranks by importance (one query each)."),
    seed: int = typer.Option(0, min=0, help="Seed of the perturbations, the sample and the attack."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress lines."),
):
    """Accuracy under character noise, word drops and swaps and case changes at several strengths, and a greedy
    character-level attack's success rate within an edit budget; written into RUN_DIR/metrics.json under
    `robustness`. Text classifiers only."""
    _threads()
    from graftune.errors import ConfigError
    from graftune.strategies.robustness import format_table
    from graftune.strategies.robustness import robustness as run_robustness

    try:
        levels = [float(s) for s in strengths.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--strengths {strengths!r}: use numbers in (0, 1] separated by commas, "
                          "e.g. 0.05,0.1,0.2") from None
    progress = None if quiet or as_json else (lambda msg: typer.echo(msg, err=True))
    result = run_robustness(run_dir, data=data, strengths=levels, sample=sample, budget=budget,
                            attack_sample=attack_sample, scan_words=scan_words, seed=seed, progress=progress)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(format_table(result))
    typer.echo(f"written to {os.path.join(run_dir, 'metrics.json')} (robustness)")
# --- end of check and robustness --------------------------------------------------------------------------------


def main():  # pragma: no cover - entry point for `python -m graftune`
    sys.exit(app())
