"""Studies: experiments and pipelines that combine the parts (data, generators, classifiers, anomaly detection).

The part packages never import from here; a study may import any of them. `presets` defines the pipeline's eight
steps per budget (smoke, cpu, full) that scripts/run_pipeline.py runs, `grid` trains and reports its
architecture x configuration grid, and each other module is one experiment with its own CLI (results/README.md).
"""
