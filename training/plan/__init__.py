"""`orch plan`: a job's training step, run on this CPU in a fake world of the job's size, before it queues.

    world.py     rank 0 of N with torch.distributed's fake backend and the job's device mesh
    measure.py   the trainer's model, parallelization, optimizer and step on FakeTensors: memory (torch's
                 FSDPMemTracker or MemTracker), the bytes of each collective, FLOPs
    devices.py   the GPUs it plans for: memory, peak FLOP/s, bandwidths, with their sources
    estimate.py  the plan: peak and headroom, roofline step time and MFU, the levers when it doesn't fit
    report.py    the plan as text or JSON, and the refusal `orch submit --check-fit` prints

The command itself is training/tools/plan.py; bench/plan_table.py runs it over the named sizes.
"""
