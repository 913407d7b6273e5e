//! Dead letters kept in memory.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::error::CQRSError;
use crate::store::{DeadLetter, DeadLetters};

/// Dead letters kept in memory (the default sink of a [`Projection`](crate::Projection)).
/// Cloning gives another handle to the same list.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use cqrs::{DeadLetters, MemoryDeadLetters};
/// let letters = MemoryDeadLetters::new();
/// assert!(letters.list("balances_v1").await.unwrap().is_empty());
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryDeadLetters {
    letters: Arc<Mutex<Vec<DeadLetter>>>,
}

impl MemoryDeadLetters {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<DeadLetter>> {
        self.letters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl DeadLetters for MemoryDeadLetters {
    async fn record(&self, letter: DeadLetter) -> Result<(), CQRSError> {
        let mut letters = self.lock();
        letters.retain(|l| !(l.projection == letter.projection && l.position == letter.position));
        letters.push(letter);
        letters.sort_by_key(|l| l.position);
        Ok(())
    }

    async fn list(&self, projection: &str) -> Result<Vec<DeadLetter>, CQRSError> {
        Ok(self
            .lock()
            .iter()
            .filter(|l| l.projection == projection)
            .cloned()
            .collect())
    }
}
