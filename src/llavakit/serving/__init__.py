"""HTTP serving: an OpenAI-compatible server and a web UI, above `llavakit.inference`."""
