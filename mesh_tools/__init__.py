"""The tools layer: commands that sit on top of the model (mesh_megatron) and the trainer (pretrain).

    hf/          mesh-export: a training checkpoint -> a Hugging Face directory
    probe/       mesh-probe: the paper's representation diagnostics for a checkpoint
    plan.py      mesh-plan: per-GPU memory and time-to-train for a Slurm job
    submit.py    mesh-submit: check a job's layout, then sbatch it
    params_cli.py  mesh-params: parameter counts and FLOPs of configs
    demo.py      `make demo`: tokenize, train, export on the shipped sample

Nothing below this layer imports it (tests/test_layering.py runs the import contract).
"""
