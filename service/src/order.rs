//! The domain: an order is placed with its lines, paid in full, then shipped; it can be
//! cancelled until it ships.

use cqrs::{Aggregate, CQRSError, DomainEvent, EventEnvelope, View};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One line of an order: so many units of a product at a unit price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    /// The product's stock-keeping unit.
    pub sku: String,
    /// How many units, at least 1.
    #[schema(format = "uint32", minimum = 1, maximum = 4294967295_u32)]
    pub quantity: u32,
    /// The price of one unit, in cents.
    #[schema(format = "uint64", minimum = 0, maximum = 18446744073709551615_u64)]
    pub unit_price_cents: u64,
}

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent, utoipa::ToSchema)]
#[serde(tag = "type")]
pub enum OrderEvent {
    /// The customer placed the order.
    #[event(name = "OrderPlaced")]
    Placed {
        /// Who ordered.
        customer: String,
        /// What was ordered.
        lines: Vec<OrderLine>,
        /// The sum of the lines, in cents.
        #[schema(format = "uint64", minimum = 0, maximum = 18446744073709551615_u64)]
        total_cents: u64,
    },
    /// The order was paid in full.
    #[event(name = "OrderPaid")]
    Paid {
        /// The amount paid, in cents (the order's total).
        #[schema(format = "uint64", minimum = 0, maximum = 18446744073709551615_u64)]
        amount_cents: u64,
        /// The payment provider's reference.
        payment_reference: String,
    },
    /// The order left the warehouse.
    #[event(name = "OrderShipped")]
    Shipped {
        /// Who carries it.
        carrier: String,
        /// The carrier's tracking number.
        tracking_number: String,
    },
    /// The order was cancelled.
    #[event(name = "OrderCancelled")]
    Cancelled {
        /// Why.
        reason: String,
    },
}

/// What an order is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderAction {
    /// Place a new order.
    Place {
        /// Who orders.
        customer: String,
        /// What is ordered: at least one line.
        lines: Vec<OrderLine>,
    },
    /// Pay the order's total.
    Pay {
        /// The amount, which must be the order's total.
        amount_cents: u64,
        /// The payment provider's reference.
        payment_reference: String,
    },
    /// Ship a paid order.
    Ship {
        /// Who carries it.
        carrier: String,
        /// The carrier's tracking number.
        tracking_number: String,
    },
    /// Cancel an order that has not shipped.
    Cancel {
        /// Why.
        reason: String,
    },
}

/// A command: an action, and optionally the sequence the order must be at for it to apply
/// (the `If-Match` of an HTTP request).
///
/// The expected sequence is checked against the state the command is decided on, and the
/// framework's append is conditional on that same sequence: if another writer appends in
/// between, the append is a conflict, the framework retries on the fresh state, and the
/// command is refused with [`OrderError::SequenceMismatch`].
///
/// ```
/// use cqrs::{CQRSFramework, MemoryEventRepository};
/// use cqrs_service::{Order, OrderAction, OrderCommand, OrderError, OrderLine};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let orders = CQRSFramework::<Order>::new(MemoryEventRepository::new());
/// let id = uuid::Uuid::new_v4();
/// let lines = vec![OrderLine { sku: "book".into(), quantity: 2, unit_price_cents: 500 }];
/// let place = OrderAction::Place { customer: "ada".into(), lines };
/// assert_eq!(orders.dispatch(id, OrderCommand::new(place)).await?.sequence, 1);
///
/// // Decided on sequence 0 (the ETag before the order was placed): refused.
/// let stale = OrderCommand {
///     expected_sequence: Some(0),
///     action: OrderAction::Cancel { reason: "tab two".into() },
/// };
/// assert_eq!(
///     orders.dispatch(id, stale).await.unwrap_err(),
///     OrderError::SequenceMismatch { expected: 0, actual: 1 }
/// );
/// # Ok::<(), OrderError>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderCommand {
    /// The sequence the order must be at, if any.
    pub expected_sequence: Option<i64>,
    /// What to do.
    pub action: OrderAction,
}

impl OrderCommand {
    /// A command with no expected sequence.
    pub fn new(action: OrderAction) -> Self {
        OrderCommand {
            expected_sequence: None,
            action,
        }
    }
}

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// No order placed under this id.
    #[default]
    None,
    /// Placed, waiting for payment.
    Placed,
    /// Paid, waiting to ship.
    Paid,
    /// Shipped: final.
    Shipped,
    /// Cancelled: final.
    Cancelled,
}

/// An order's state, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    /// The number of events folded: the order's sequence.
    pub sequence: i64,
    /// Where the order is.
    pub status: OrderStatus,
    /// The total to pay, in cents.
    pub total_cents: u64,
}

/// Why an order refused a command, or the framework failed.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum OrderError {
    /// The order is not at the sequence the command expected (`If-Match`).
    #[error("the order is at sequence {actual}, not {expected}")]
    SequenceMismatch {
        /// The sequence the command expected.
        expected: i64,
        /// The order's sequence.
        actual: i64,
    },
    /// No order was placed under this id.
    #[error("no order with this id")]
    NotFound,
    /// An order was already placed under this id.
    #[error("an order with this id exists")]
    AlreadyPlaced,
    /// The order has no lines.
    #[error("an order needs at least one line")]
    NoLines,
    /// A line is not valid.
    #[error("invalid line: {0}")]
    InvalidLine(String),
    /// The amount paid is not the order's total.
    #[error("the order's total is {total_cents} cents, not {offered_cents}")]
    WrongAmount {
        /// The order's total.
        total_cents: u64,
        /// The amount offered.
        offered_cents: u64,
    },
    /// The order was paid already.
    #[error("the order is paid already")]
    AlreadyPaid,
    /// The order cannot ship before it is paid.
    #[error("the order is not paid")]
    NotPaid,
    /// The order has shipped.
    #[error("the order has shipped")]
    AlreadyShipped,
    /// The order was cancelled.
    #[error("the order is cancelled")]
    Cancelled,
    /// The framework failed: a conflict its retries did not resolve, a store that failed.
    #[error(transparent)]
    Framework(#[from] CQRSError),
}

/// The order aggregate, stored as `"order"`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Order;

#[cqrs::aggregate(name = "order")]
impl Aggregate for Order {
    async fn handle_command(
        &self,
        _id: Uuid,
        state: &OrderState,
        command: OrderCommand,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        if let Some(expected) = command.expected_sequence {
            if expected != state.sequence {
                return Err(OrderError::SequenceMismatch {
                    expected,
                    actual: state.sequence,
                });
            }
        }
        decide(state, command.action).map(|event| vec![event])
    }

    fn handle_event(&self, state: &mut OrderState, event: &OrderEvent) {
        state.sequence += 1;
        match event {
            OrderEvent::Placed { total_cents, .. } => {
                state.status = OrderStatus::Placed;
                state.total_cents = *total_cents;
            }
            OrderEvent::Paid { .. } => state.status = OrderStatus::Paid,
            OrderEvent::Shipped { .. } => state.status = OrderStatus::Shipped,
            OrderEvent::Cancelled { .. } => state.status = OrderStatus::Cancelled,
        }
    }
}

/// The event an action causes on an order in `state`, or why it is refused.
fn decide(state: &OrderState, action: OrderAction) -> Result<OrderEvent, OrderError> {
    use OrderStatus as S;
    match (state.status, action) {
        (S::None, OrderAction::Place { customer, lines }) => {
            let total_cents = total(&lines)?;
            Ok(OrderEvent::Placed {
                customer,
                lines,
                total_cents,
            })
        }
        (_, OrderAction::Place { .. }) => Err(OrderError::AlreadyPlaced),
        (S::None, _) => Err(OrderError::NotFound),
        (S::Cancelled, _) => Err(OrderError::Cancelled),
        (
            S::Placed,
            OrderAction::Pay {
                amount_cents,
                payment_reference,
            },
        ) => {
            if amount_cents != state.total_cents {
                return Err(OrderError::WrongAmount {
                    total_cents: state.total_cents,
                    offered_cents: amount_cents,
                });
            }
            Ok(OrderEvent::Paid {
                amount_cents,
                payment_reference,
            })
        }
        (S::Paid | S::Shipped, OrderAction::Pay { .. }) => Err(OrderError::AlreadyPaid),
        (
            S::Paid,
            OrderAction::Ship {
                carrier,
                tracking_number,
            },
        ) => Ok(OrderEvent::Shipped {
            carrier,
            tracking_number,
        }),
        (S::Placed, OrderAction::Ship { .. }) => Err(OrderError::NotPaid),
        (S::Shipped, _) => Err(OrderError::AlreadyShipped),
        (S::Placed | S::Paid, OrderAction::Cancel { reason }) => {
            Ok(OrderEvent::Cancelled { reason })
        }
    }
}

/// The sum of the lines, in cents, or why they are not an order.
fn total(lines: &[OrderLine]) -> Result<u64, OrderError> {
    if lines.is_empty() {
        return Err(OrderError::NoLines);
    }
    lines.iter().try_fold(0u64, |sum, line| {
        if line.quantity == 0 {
            return Err(OrderError::InvalidLine(format!(
                "{}: the quantity is 0",
                line.sku
            )));
        }
        line.unit_price_cents
            .checked_mul(u64::from(line.quantity))
            .and_then(|amount| sum.checked_add(amount))
            .ok_or_else(|| OrderError::InvalidLine(format!("{}: the total overflows", line.sku)))
    })
}

/// An order as the queries show it, kept by a [`cqrs::Projection`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderSummary {
    /// The order's id.
    pub order_id: Option<Uuid>,
    /// The order's sequence: the number of its events applied.
    pub sequence: i64,
    /// Where the order is.
    pub status: OrderStatus,
    /// Who ordered.
    pub customer: String,
    /// What was ordered.
    pub lines: Vec<OrderLine>,
    /// The total, in cents.
    #[schema(format = "uint64", minimum = 0, maximum = 18446744073709551615_u64)]
    pub total_cents: u64,
    /// The payment provider's reference, once paid.
    pub payment_reference: Option<String>,
    /// The carrier and its tracking number, once shipped.
    pub shipment: Option<Shipment>,
    /// Why it was cancelled, if it was.
    pub cancellation_reason: Option<String>,
}

/// Who carries an order and its tracking number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Shipment {
    /// The carrier.
    pub carrier: String,
    /// The carrier's tracking number.
    pub tracking_number: String,
}

#[cqrs::view(table = "order_summary")]
impl View<Order> for OrderSummary {
    fn handle_event(&mut self, envelope: &EventEnvelope<OrderEvent>) -> Result<(), OrderError> {
        self.order_id = Some(envelope.aggregate_id);
        self.sequence = envelope.sequence;
        match &envelope.event {
            OrderEvent::Placed {
                customer,
                lines,
                total_cents,
            } => {
                self.status = OrderStatus::Placed;
                self.customer.clone_from(customer);
                self.lines.clone_from(lines);
                self.total_cents = *total_cents;
            }
            OrderEvent::Paid {
                payment_reference, ..
            } => {
                self.status = OrderStatus::Paid;
                self.payment_reference = Some(payment_reference.clone());
            }
            OrderEvent::Shipped {
                carrier,
                tracking_number,
            } => {
                self.status = OrderStatus::Shipped;
                self.shipment = Some(Shipment {
                    carrier: carrier.clone(),
                    tracking_number: tracking_number.clone(),
                });
            }
            OrderEvent::Cancelled { reason } => {
                self.status = OrderStatus::Cancelled;
                self.cancellation_reason = Some(reason.clone());
            }
        }
        Ok(())
    }
}
