"""How Ray is reached: connecting or starting a private local head, watching it, rendezvous, resources, failure policy, preflight and the console progress of a job."""
