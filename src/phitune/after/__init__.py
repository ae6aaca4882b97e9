"""What runs from a run's output directory, and the scoring the recipes borrow: evaluate, benchmarks, generate/chat,
rewards, reward models, metrics, merge, export (GGUF, Ollama), serve, hub, report. Below the lifecycle: a recipe
scores with it and a finished run pushes through hub."""
