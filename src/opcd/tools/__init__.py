"""Commands around training: bench, demo, experience extraction, hub, chat."""
