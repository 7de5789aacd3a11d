"""The event backbone: Avro serde, schema and topic catalogs, Kafka clients, the embedded broker."""
