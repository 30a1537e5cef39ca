"""What results look like to a person: text tables (tables.py, run.py, pruning.py, plan.py, bench.py),
figures (pruning.py, html.py, bench.py) and the HTML report (html.py). Modules here read results and
draw them; they never compute them."""
