"""The one `kubetune` command. Every subcommand imports its module lazily, so `kubetune --help`,
`apply`, `crds` and `operator` never load torch."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def _run(args: argparse.Namespace) -> int:
    import os

    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.config.loader import import_object
    from kubetune.trainer.registry import get_recipe, refuse_unless_distributed

    info = get_recipe(args.recipe)
    if args.nproc_per_node is not None or args.nnodes > 1:
        refuse_unless_distributed(info, args.nnodes * (args.nproc_per_node or 1))
        resolve_config(args.recipe, args.config, args.overrides)  # a bad config fails here, not N times
        return _launch(args)
    refuse_unless_distributed(info, int(os.environ.get("WORLD_SIZE", "1")))
    cfg = resolve_config(args.recipe, args.config, args.overrides)
    recipe_main = import_object(f"{info.module}:recipe_main")
    recipe_main(cfg)
    return 0


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """`python -m torch.distributed.run ... -m kubetune.cli run RECIPE ...`: torch's own launcher
    (torchrun) starts nnodes x nproc_per_node ranks of this same command. One node: a standalone
    rendezvous on a free local port. Several: static rendezvous at --master-addr:--master-port."""
    import sys

    nproc = args.nproc_per_node or 1
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.nnodes}", f"--nproc-per-node={nproc}"]
    if args.nnodes == 1:
        argv.append("--standalone")
    else:
        argv += [f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}", f"--master-port={args.master_port}"]
    argv += ["-m", "kubetune.cli", "run", args.recipe]
    if args.config:
        argv += ["--config", args.config]
    return argv + list(args.overrides)


def _launch(args: argparse.Namespace) -> int:
    """Replace this process with torchrun: its exit status (non-zero when any rank fails, with that
    rank named in its error report) and signals (SIGTERM reaches every rank) are the run's own."""
    import os

    argv = torchrun_argv(args)
    print(f"kubetune: launching {args.nnodes * (args.nproc_per_node or 1)} processes: {' '.join(argv[1:])}", file=sys.stderr)
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # not reached


def _ls(args: argparse.Namespace) -> int:
    from kubetune.trainer.config.catalog import list_builtin_configs
    from kubetune.trainer.registry import RECIPES

    configs = list_builtin_configs()
    width = max(len(name) for name in RECIPES)
    print(f"{'RECIPE':<{width}}  CONFIGS")
    for name in RECIPES:
        print(f"{name:<{width}}  {', '.join(configs.get(name, [])) or '-'}")
    return 0


def _cp(args: argparse.Namespace) -> int:
    from kubetune.trainer.config.catalog import copy_builtin_config

    dest = copy_builtin_config(args.name, args.dest, overwrite=args.force)
    print(f"copied {args.name} to {dest}", file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from kubetune.trainer.config.catalog import validate_config_file

    recipe = validate_config_file(args.config, recipe=args.recipe)
    print(f"{args.config}: valid config for {recipe}")
    return 0


def _lazy(dotted: str) -> Callable[[argparse.Namespace], int]:
    """A handler that lives in another module, imported only when its subcommand runs."""

    def handler(args: argparse.Namespace) -> int:
        from kubetune.trainer.config.loader import import_object

        return int(import_object(dotted)(args) or 0)

    return handler


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from kubetune import __version__

    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune, align, evaluate and serve LLMs, locally or on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a recipe: kubetune run [--nproc-per-node G] RECIPE --config F [key=value ...]",
        description="Run a recipe in this process, or with --nproc-per-node G (and --nnodes N) as N x G "
        "processes through torch's launcher (torch.distributed.run, i.e. torchrun): full_finetune, "
        "lora_finetune and dpo then train with FSDP2 (NCCL on GPUs, gloo on CPUs; config key distributed.*). "
        "Recipes that run in one process only (eval, generate) refuse to start with several.",
        epilog="examples:\n"
        "  kubetune run full_finetune --config tiny_full\n"
        "  kubetune run --nproc-per-node 8 full_finetune --config llama3_1_8b_full_fsdp8\n"
        "  kubetune run --nnodes 2 --node-rank 0 --master-addr host0 --nproc-per-node 8 lora_finetune -c my.yaml\n"
        "Already inside torchrun (WORLD_SIZE set), `kubetune run RECIPE` is one rank of the run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", help="full_finetune, lora_finetune, dpo, generate, eval (see `kubetune ls`)")
    run.add_argument("--config", "-c", help="config file or built-in config name")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-4")
    run.add_argument("--nproc-per-node", type=_positive_int, default=None, metavar="G",
                     help="processes per machine (one per GPU); runs the recipe under torchrun")
    run.add_argument("--nnodes", type=_positive_int, default=1, metavar="N", help="machines taking part (default 1)")
    run.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..N-1 (with --nnodes > 1)")
    run.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (with --nnodes > 1)")
    run.add_argument("--master-port", type=int, default=29500, help="port on node 0 (with --nnodes > 1)")
    run.set_defaults(handler=_run)

    ls = sub.add_parser("ls", help="list recipes and built-in configs")
    ls.set_defaults(handler=_ls)

    cp = sub.add_parser("cp", help="copy a built-in config: kubetune cp NAME dest.yaml")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true", help="overwrite dest if it exists")
    cp.set_defaults(handler=_cp)

    validate = sub.add_parser("validate", help="check a config without running it")
    validate.add_argument("config")
    validate.add_argument("--recipe", help="recipe to validate against (default: the config's `recipe:` key)")
    validate.set_defaults(handler=_validate)

    apply = sub.add_parser("apply", help="run kubetune manifests locally (the embedded backend)")
    apply.add_argument("-f", "--filename", required=True, action="append",
                       help="manifest file or folder of them (FineTuneJob, EvalJob, ModelDeployment); repeatable")
    apply.add_argument("--runs-dir", default="runs", help="where local runs keep status and outputs")
    apply.add_argument("--no-progress", action="store_true", help="no progress bar")
    apply.add_argument("--detach", "-d", action="store_true", help="return once the ModelDeployments' servers are up")
    apply.set_defaults(handler=_lazy("kubetune.operator.local:apply_command"))

    plan = sub.add_parser("plan", help="print the Kubernetes objects the operator would create for a manifest (YAML)")
    plan.add_argument("-f", "--filename", required=True, help="manifest file (FineTuneJob)")
    plan.add_argument("--backend", choices=("auto", "job", "pytorchjob", "jobset", "trainjob"), help="plan for this backend instead of spec.backend")
    plan.set_defaults(handler=_lazy("kubetune.operator.dryrun:plan_command"))

    initialize = sub.add_parser("initialize", help="fetch a job's hf:// and s3:// sources into the cache (the init container's command)")
    initialize.add_argument("--plan", required=True, help="the initializer plan (sources.yaml of the job's ConfigMap)")
    initialize.set_defaults(handler=_lazy("kubetune.operator.fetch:initialize_command"))
    delete = sub.add_parser("delete", help="stop local servers and remove local runs: -f FILE_OR_FOLDER, or KIND NAME...")
    delete.add_argument("kind", nargs="?", help="finetunejobs|ftj|evaljobs|evj|modeldeployments|mdep")
    delete.add_argument("names", nargs="*", help="names of that kind")
    delete.add_argument("-f", "--filename", action="append", help="manifest file or folder (repeatable)")
    delete.add_argument("--runs-dir", default="runs")
    delete.set_defaults(handler=_lazy("kubetune.operator.local_pipeline:delete_command"))

    get = sub.add_parser("get", help="list local runs, like `kubectl get`")
    get.add_argument("kind", nargs="?", default="all", help="finetunejobs|ftj|evaljobs|evj|modeldeployments|mdep|all")
    get.add_argument("--runs-dir", default="runs")
    get.set_defaults(handler=_lazy("kubetune.operator.local:get_command"))

    crds = sub.add_parser("crds", help="print the CRDs generated from the API models")
    crds.add_argument("--out", help="write one YAML file per CRD into this folder instead of stdout")
    crds.set_defaults(handler=_lazy("kubetune.operator.crdgen:crds_command"))

    operator = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    operator.add_argument("--namespace", "-n", action="append", help="watch only these namespaces (repeatable)")
    operator.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="liveness endpoint URL")
    operator.add_argument("--metrics-port", type=int, default=8080)
    operator.add_argument("--peering", default=None, help="peering name for HA (default: standalone)")
    operator.add_argument(
        "--priority", type=int, default=None, help="peering priority (default: random, so replicas never tie)"
    )
    operator.set_defaults(handler=_lazy("kubetune.operator.main:operator_command"))

    serve = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API")
    serve.add_argument("model_dir")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="LoRA adapter (repeatable)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-concurrency", type=int, default=16)
    serve.add_argument("--max-queue", type=int, default=64)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--device", default="auto")
    serve.add_argument("--dtype", default="fp32")
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="require `Authorization: Bearer KEY` on /v1/* (repeatable; also $KUBETUNE_SERVE_API_KEY)")
    serve.add_argument("--api-key-file", default=None, metavar="FILE",
                       help="API keys, one per line (a mounted Secret; also $KUBETUNE_SERVE_API_KEY_FILE)")
    serve.add_argument("--max-sequences-per-client", type=int, default=None,
                       help="running + waiting sequences one client (API key) may hold (default: no limit)")
    serve.add_argument("--prefix-cache-mb", type=float, default=256,
                       help="memory for K/V of recent prompt prefixes, reused by prompts that start alike (0: off)")
    serve.add_argument("--max-prefill-tokens", type=int, default=4096,
                       help="padded prompt tokens per prefill forward (new sequences are prefilled together)")
    serve.add_argument("--allow-ignore-eos", action="store_true", help="accept the `ignore_eos` request field")
    serve.add_argument("--max-request-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    serve.add_argument("--request-timeout", type=float, default=30.0,
                       help="seconds a client may take to send a request's headers or body (default 30)")
    serve.add_argument("--max-connections", type=int, default=256,
                       help="open connections before new requests get 503 (uvicorn's limit_concurrency; default 256)")
    serve.set_defaults(handler=_lazy("kubetune.trainer.serve.cli:serve_command"))

    download = sub.add_parser("download", help="download a model from the Hugging Face Hub (like `tune download`)")
    download.add_argument("repo_id", help="org/name, optionally @revision")
    download.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    download.add_argument("--output-dir", default=None,
                          help="copy the files into this folder (default: the Hugging Face cache, which model.path=org/name reads)")
    download.add_argument("--ignore-patterns", action="append", default=None, metavar="GLOB",
                          help="files to skip (repeatable; default: original/*)")
    download.add_argument("--all-files", action="store_true",
                          help="every file of the repository (default: config, safetensors, tokenizer files)")
    download.set_defaults(handler=_lazy("kubetune.trainer.hub:download_command"))

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    merge.add_argument("--base", required=True)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--out", required=True)
    merge.set_defaults(handler=_lazy("kubetune.trainer.peft.merge:merge_command"))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse hands `key=value` overrides that follow `--config F` back as unknown arguments
    # (a positional list cannot resume after an option); they belong to `run`.
    if extra and args.command == "run" and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from kubetune.errors import KubetuneError

    args = parse_args(argv)
    try:
        return args.handler(args)
    except KubetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
