"""The lab: grids of methods x settings x evaluations in one command, cached, resumable, in a database.

A grid file (YAML) names fixed settings, the axes to sweep, include/exclude rules and the evaluations to
run on every cell. `llamalab lab run GRID.yaml` expands it into cells, builds each expensive product once
(a quantized model, keyed by the content hash of what made it), runs the cells in local worker processes
or as Ray tasks, and records each finished cell in one database transaction (SQLite beside the grid, or any
SQLAlchemy URL). The read side pivots, plots Pareto fronts, writes one HTML report or a markdown page from
a template, and exports to MLflow.

Files, one job each:

- `grid.py`      the grid file: parse, validate names before any work, expand into cells
- `settings.py`  which setting keys exist (model options, `quant.*`) and how a cell becomes ModelOptions
- `evals.py`     the evaluations a grid can name (ppl, choice, passkey, needle, speed, memory)
- `artifacts.py` products built once and shared (quantized models), stored by content hash
- `store.py`     the database schema and the only code that writes it
- `worker.py`    what runs in a worker process: build an artifact, run a cell's evaluations
- `executors.py` local worker processes (concurrent.futures) or Ray tasks behind one `submit`
- `runner.py`    the driver: resume, schedule artifacts before the cells that need them, record
- `results.py`   cells and metrics read back as flat rows; pivot tables (markdown, CSV)
- `plots.py`     quality against cost with the Pareto front marked (PNG, SVG)
- `report.py`    one self-contained HTML page, and markdown pages from a grid's Jinja template
- `mlflow_export.py`  cells as MLflow runs
- `cli.py`       `llamalab lab run|status|table|plot|report|export`
"""
