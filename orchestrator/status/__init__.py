"""`orch status`: collect.py gathers the facts, render.py draws them, live.py runs the loop."""
