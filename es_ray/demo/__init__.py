"""`es-ray demo` (`make demo`): the whole self-improvement loop on a BEIR collection, round after round.

config.py  the demo's settings (configs/demo.yaml)
traffic.py search traffic kept up during a cycle, counting failed requests
cycle.py   submits the `es_ray.lifecycle.cycle` Ray job and follows its steps with progress bars
loop.py    load the sample, then rounds: simulated users -> improvement -> cycle -> quality
report.py  the per-round table, the PNG plot and the markdown report
"""
