"""The offline demo world: what the jobs use as their embedded default on a machine with no model hub and no data.

- `render`: procedural dermoscopy-like lesions with exact masks, written in HAM10000's layout (easy and hard);
- `world`: that data prepared through the prepare job's code, the shipped demo bases made ready and
  measured, and the jobs' embedded defaults (`finetune_defaults`, `generate_defaults`, ...);
- `chain`: the whole chain on one machine (jobs/demo.py).

A test bed, not a result (docs/demo.md).  The stages and the model never import it.
"""
