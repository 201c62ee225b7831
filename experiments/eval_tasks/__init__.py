"""Local lm-eval tasks built from held-out standard-library sources (build.py); load them with
`lm_eval.tasks.TaskManager(include_path=...)` on this directory."""
