"""Models and data, offline first: models from a local directory, the Hugging Face cache or the
built-in architectures (models.py, configs/*.json), task specs and metrics (tasks.py), and the
rows of a task from GLUE TSV, local files or the datasets cache (loaders.py). Imports core/
(to restore a model before saving it).
"""
