"""Kafka from the tests' side, with an independent client (confluent-kafka, librdkafka 2.16).

    python kafka_tool.py create BROKERS TOPIC PARTITIONS
    python kafka_tool.py consume BROKERS TOPIC COUNT [SECONDS]
    python kafka_tool.py lag BROKERS TOPIC GROUP

`consume` reads COUNT records from the start of every partition and prints each
as a JSON line: partition, offset, key, headers (values as text) and value (as text).
`lag` prints the records of TOPIC past GROUP's committed offsets, all partitions together (a
partition without a committed offset counts whole).
"""

import json
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def create(brokers, topic, partitions):
    admin = AdminClient({"bootstrap.servers": brokers})
    futures = admin.create_topics([NewTopic(topic, num_partitions=int(partitions), replication_factor=1)])
    for future in futures.values():
        future.result(30)


def consume(brokers, topic, count, seconds="60"):
    # Partitions are assigned rather than joined through a consumer group: a group join costs
    # seconds of rebalancing per call, and the test reads every partition anyway.
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "tests", "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    deadline = time.time() + float(seconds)
    read = 0
    while read < int(count) and time.time() < deadline:
        message = consumer.poll(1.0)
        if message is None:
            continue
        if message.error():
            raise SystemExit(f"consume: {message.error()}")
        read += 1
        headers = {k: (v.decode("utf-8") if v is not None else None) for k, v in (message.headers() or [])}
        print(
            json.dumps(
                {
                    "partition": message.partition(),
                    "offset": message.offset(),
                    "key": message.key().decode("utf-8") if message.key() is not None else None,
                    "headers": headers,
                    "value": message.value().decode("utf-8") if message.value() is not None else None,
                }
            ),
            flush=True,
        )
    consumer.close()


def lag(brokers, topic, group):
    # Counted by reading what lies past the committed offsets, not from the high watermark:
    # Tansu reports the watermark of its last record batch, not of its last record.
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=30)
    consumer.assign(
        [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING) for tp in committed]
    )
    total, quiet = 0, 0
    while quiet < 3:
        message = consumer.poll(1.0)
        if message is None:
            quiet += 1
        elif not message.error():
            total += 1
    consumer.close()
    print(total)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"create": create, "consume": consume, "lag": lag}[command](*args)
