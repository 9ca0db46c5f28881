"""Results to the lab's systems: HL7 v2 over MLLP and FHIR, from a durable outbox in the case store."""
