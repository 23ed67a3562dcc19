"""fedchain's chain side: compile the contracts, deploy them, talk to them, read their events."""
