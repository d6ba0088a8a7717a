"""Scaling-law sweeps on the control plane: fitting a loss law to the members' final losses (numpy and scipy,
never torch). approach2: IsoFLOP parabolas and power laws; approach3: the parametric L(N, D); bootstrap: the
intervals; fit: fit.json from rows; report: report.md and its plots. docs/scaling.md says how to read them."""

# A sweep's folder, <runs_dir>/<sweep id>/: the plan written at submit, then the fit and its report.
SWEEP_PLAN = "sweep.json"  # each member's id, run folder, shape, N, D, C and steps; parallel; fit_budgets
FIT = "fit.json"
REPORT = "report.md"
