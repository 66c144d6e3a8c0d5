"""Running a manifest on this machine: local ranks with the same launch contract as the operator's pods."""
