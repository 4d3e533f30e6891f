"""llmkiln's cross-cutting pieces every side may use: errors, config, logging, progress, paths."""
