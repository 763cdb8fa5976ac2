//! Who may read a partition: the Event Hubs epoch (owner level) rules.
//!
//! Per (event hub, consumer group, partition), as the service documents them:
//!
//! | Already attached | New receiver | Outcome |
//! |---|---|---|
//! | nothing | any | admitted |
//! | epoch `e1` | epoch `e2 >= e1` | admitted; the old one is detached with `amqp:link:stolen` |
//! | epoch `e1` | epoch `e2 < e1` | refused with `amqp:link:stolen` |
//! | epoch `e1` | no epoch | refused with `amqp:link:stolen` |
//! | only non-epoch receivers | epoch | admitted; all of them are detached with `amqp:link:stolen` |
//! | fewer than 5 non-epoch receivers | no epoch | admitted |
//! | 5 non-epoch receivers | no epoch | refused with `amqp:resource-limit-exceeded` |
//!
//! An equal epoch wins. That is what lets an `EventProcessor` (every receiver at epoch 0) take a
//! partition over from another processor.

/// The service's limit on concurrent non-epoch receivers per consumer group and partition.
pub(crate) const MAX_NON_EPOCH_RECEIVERS: usize = 5;

/// A receiver link attached to a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reader {
    /// The broker's link id.
    pub(crate) link: u64,
    /// `com.microsoft:epoch`, when the receiver set one.
    pub(crate) epoch: Option<i64>,
}

/// Why a receiver is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A receiver with a higher epoch owns the partition.
    LowerEpoch { current: i64 },
    /// An epoch receiver owns the partition and the new one has no epoch.
    EpochReceiverExists { current: i64 },
    /// Five non-epoch receivers are already attached.
    TooManyReaders,
}

/// The decision for a new receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Attach it, after detaching these links with `amqp:link:stolen`.
    Admit { evict: Vec<u64> },
    /// Refuse it.
    Refuse(Refusal),
}

/// Applies the module rules to a receiver with `epoch` joining `readers`.
pub(crate) fn admit(readers: &[Reader], epoch: Option<i64>) -> Admission {
    let current = readers.iter().filter_map(|r| r.epoch).max();
    match (epoch, current) {
        (Some(new), Some(current)) if new < current => {
            Admission::Refuse(Refusal::LowerEpoch { current })
        }
        (Some(_), _) => Admission::Admit {
            evict: readers.iter().map(|r| r.link).collect(),
        },
        (None, Some(current)) => Admission::Refuse(Refusal::EpochReceiverExists { current }),
        (None, None) if readers.len() >= MAX_NON_EPOCH_RECEIVERS => {
            Admission::Refuse(Refusal::TooManyReaders)
        }
        (None, None) => Admission::Admit { evict: Vec::new() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(link: u64, epoch: Option<i64>) -> Reader {
        Reader { link, epoch }
    }

    #[test]
    fn first_reader_is_admitted() {
        assert_eq!(admit(&[], None), Admission::Admit { evict: vec![] });
        assert_eq!(admit(&[], Some(0)), Admission::Admit { evict: vec![] });
    }

    #[test]
    fn equal_or_higher_epoch_steals() {
        let readers = [reader(1, Some(0))];
        assert_eq!(
            admit(&readers, Some(0)),
            Admission::Admit { evict: vec![1] }
        );
        assert_eq!(
            admit(&readers, Some(5)),
            Admission::Admit { evict: vec![1] }
        );
    }

    #[test]
    fn lower_epoch_is_refused() {
        let readers = [reader(1, Some(3))];
        assert_eq!(
            admit(&readers, Some(2)),
            Admission::Refuse(Refusal::LowerEpoch { current: 3 })
        );
    }

    #[test]
    fn non_epoch_reader_cannot_join_an_owned_partition() {
        let readers = [reader(1, Some(0))];
        assert_eq!(
            admit(&readers, None),
            Admission::Refuse(Refusal::EpochReceiverExists { current: 0 })
        );
    }

    #[test]
    fn epoch_reader_evicts_every_non_epoch_reader() {
        let readers = [reader(1, None), reader(2, None)];
        assert_eq!(
            admit(&readers, Some(0)),
            Admission::Admit { evict: vec![1, 2] }
        );
    }

    #[test]
    fn non_epoch_readers_share_up_to_the_limit() {
        let mut readers = Vec::new();
        for link in 0..MAX_NON_EPOCH_RECEIVERS as u64 {
            assert_eq!(admit(&readers, None), Admission::Admit { evict: vec![] });
            readers.push(reader(link, None));
        }
        assert_eq!(
            admit(&readers, None),
            Admission::Refuse(Refusal::TooManyReaders)
        );
    }
}
