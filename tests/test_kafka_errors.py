"""Consumer errors at the Kafka edge: which end the consumer with what to do, which are retried."""

import pytest
from confluent_kafka import KafkaError

from streamlearn import kafka
from streamlearn.errors import ConfigError


class Polled:
    """A polled message that carries only an error, as librdkafka hands consumer errors over."""

    def __init__(self, code: int) -> None:
        self._error = KafkaError(code, "JoinGroup failed: Broker: Inconsistent group protocol")

    def error(self) -> KafkaError:
        return self._error


def test_a_group_of_another_assignment_strategy_is_refused_in_one_line_naming_the_group():
    with pytest.raises(ConfigError) as refused:
        kafka.message_error(Polled(KafkaError.INCONSISTENT_GROUP_PROTOCOL), group="fraud")
    message = str(refused.value)
    assert "'fraud'" in message and "its own --group" in message and "\n" not in message


@pytest.mark.parametrize("code", [KafkaError.INVALID_GROUP_ID, KafkaError.GROUP_AUTHORIZATION_FAILED])
def test_other_errors_no_retry_ends_are_refused_too(code):
    with pytest.raises(ConfigError, match=r"'fraud'.*--group"):
        kafka.message_error(Polled(code), group="fraud")


@pytest.mark.parametrize(
    "code", [KafkaError.UNKNOWN_MEMBER_ID, KafkaError.REBALANCE_IN_PROGRESS, KafkaError._TRANSPORT]
)
def test_errors_a_retry_ends_are_handed_back(code):
    assert kafka.message_error(Polled(code), group="fraud").code() == code


def test_without_a_group_the_reader_is_not_told_about_groups():
    # readers that assign partitions themselves (the dead-letter reader) join no group
    error = kafka.message_error(Polled(KafkaError.INCONSISTENT_GROUP_PROTOCOL))
    assert error is not None and error.code() == KafkaError.INCONSISTENT_GROUP_PROTOCOL
