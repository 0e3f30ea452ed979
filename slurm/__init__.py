"""SLURM for wurst: sbatch templates (``template``), submission, chains and status (``submit``),
preemption-safe requeue for Lightning (``preemption``), the chain's pipeline.json (``manifest``), sweep
summaries (``sweep``) and the loopback test cluster (``cluster``). Command line:
``python -m wurst.slurm {submit,chain,status,manifest,cluster-up,cluster-down}``.
"""
