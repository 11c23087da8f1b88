"""The worker's HTTP surface: health, metrics and the event intake (`create_app`)."""
