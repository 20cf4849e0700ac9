"""The ground floor every stage may use: errors, logs, options, runtime, checkpoint files and the run-directory format."""
