"""Config, the `liverec` CLI, Kafka and RocksDB wiring, metrics, the local broker and launcher."""
