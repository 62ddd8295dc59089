"""``python -m skipvision slurm``: write the sbatch script of a recipe and submit it (skipvision/launch/slurm.py).

    python -m skipvision slurm --recipe shapes-tiny --nodes 2 --gpus-per-node 4 trainer.devices=4
    python -m skipvision slurm --recipe shapes-tiny --dry-run      # write and print the script only

Prints the job id on stdout (the script with ``--dry-run``); where the script and logs are goes to stderr.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    slurm = sub.add_parser(
        "slurm",
        help="train a recipe on a SLURM cluster: write an sbatch script that runs fit on N nodes, and submit it",
        description="Write <output_dir>/slurm/job.sbatch for the recipe and submit it with sbatch. The job resumes "
        "from its newest checkpoint when SLURM requeues it (USR1 before the time limit).",
    )
    slurm.add_argument("--recipe", required=True, help="recipe YAML path, or a shipped recipe's name (see list)")
    slurm.add_argument("--nodes", type=int, help="nodes (default: the recipe's trainer.num_nodes)")
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs to request per node (0: none)")
    slurm.add_argument("--time", default="01:00:00", help="time limit, e.g. HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--partition", help="partition (default: the cluster's default)")
    slurm.add_argument("--job-name", help="job name (default: the recipe's name; never bash or interactive)")
    slurm.add_argument(
        "--requeue-signal-s",
        type=int,
        default=120,
        help="seconds before the time limit at which SLURM sends USR1: save, requeue, resume (default 120)",
    )
    slurm.add_argument("--python", help="the Python on the nodes (default: the one running this command)")
    slurm.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
    slurm.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. trainer.devices=4")


def run_slurm(args: argparse.Namespace) -> None:
    from skipvision.launch.slurm import plan_job, render_sbatch, sbatch_path, submit, write_script

    job = plan_job(
        args.recipe,
        args.overrides,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        time=args.time,
        partition=args.partition,
        job_name=args.job_name,
        requeue_signal_s=args.requeue_signal_s,
        python=args.python,
    )
    if args.dry_run:
        script = write_script(job)
        print(render_sbatch(job), end="")
        print(f"skipvision slurm: wrote {script} (not submitted)", file=sys.stderr)
        return
    sbatch = sbatch_path()  # before writing anything
    script = write_script(job)
    job_id = submit(script, sbatch)
    print(job_id)
    print(
        f"skipvision slurm: submitted job {job_id} ({job.nodes} x {job.tasks_per_node} tasks); script {script}, "
        f"logs {job.slurm_dir}/{job_id}.out and .err, run folder {job.output_dir}",
        file=sys.stderr,
    )
