"""The plugin host: finds plugins, registers them with pluggy, collects what they register, and
checks a recipe against what is installed."""
