"""Runtime code shared by every service: config, errors, telemetry, channels, server lifecycle."""
