//! Rules that span several attributes, checked once every attribute is read.

use crate::ast::{Event, Input};
use crate::ctxt::Ctxt;

/// Every rule that spans several attributes: unique names, sound upcast chains.
pub fn check(cx: &mut Ctxt, input: &Input) {
    check_current_names(cx, input);
    for (_, event) in input.events() {
        check_chain(cx, event);
    }
    check_old_names(cx, input);
}

/// Two events of one type stored under the same (name, version) could not be told apart
/// when read back: the second one is refused, at its name, naming the first.
fn check_current_names(cx: &mut Ctxt, input: &Input) {
    let events = input.events();
    for (index, (variant, event)) in events.iter().enumerate() {
        let first = events[..index]
            .iter()
            .find(|(_, earlier)| earlier.name == event.name && earlier.version == event.version);
        if let Some((first_variant, _)) = first {
            let first =
                first_variant.map_or_else(String::new, |ident| format!("variant `{ident}`"));
            let this = variant.map_or_else(String::new, |ident| format!(" for `{ident}`"));
            cx.syn_error(syn::Error::new(
                event.name_span,
                format!(
                    "duplicate event name and version{this}: {first} is already stored as \
                     `{}` version \"{}\"; give this one another `name`, or another `version` \
                     if it is an older shape of the same event",
                    event.name, event.version
                ),
            ));
        }
    }
}

/// Who reads a (name, version): "variant `X`" / "the struct", as the current version or
/// through an upcast step.
fn reader(variant: Option<&syn::Ident>, step: bool) -> String {
    let owner = variant.map_or_else(
        || "the struct".to_owned(),
        |ident| format!("variant `{ident}`"),
    );
    if step {
        format!("an upcast step of {owner}")
    } else {
        format!("{owner} (its current version)")
    }
}

/// Every old (name, version) an upcast step reads is read by nothing else: not by a current
/// event, not by another event's step. The second claim is refused, at its `from`.
pub fn check_old_names(cx: &mut Ctxt, input: &Input) {
    let events = input.events();
    let mut claimed: Vec<(&str, &str, Option<&syn::Ident>)> = Vec::new();
    for (index, (variant, event)) in events.iter().enumerate() {
        for step in &event.upcasts {
            let name = event.old_name(step);
            let version = step.from.value.as_str();
            let current = events.iter().enumerate().find(|(other, (_, current))| {
                *other != index && current.name == name && current.version == version
            });
            let earlier = claimed
                .iter()
                .find(|(n, v, owner)| *n == name && *v == version && owner != variant);
            let first = match (current, earlier) {
                (Some((_, (owner, _))), _) => Some(reader(*owner, false)),
                (None, Some((_, _, owner))) => Some(reader(*owner, true)),
                (None, None) => None,
            };
            if let Some(first) = first {
                cx.error_spanned_by(
                    &step.from.lit,
                    format!(
                        "`{name}` version \"{version}\" is already read by {first}; a stored \
                         (name, version) is read by one event only: give this step the `name` \
                         the old version was really stored under"
                    ),
                );
            }
        }
        for step in &event.upcasts {
            claimed.push((event.old_name(step), &step.from.value, *variant));
        }
    }
}

/// One event's chain: every step reads a version older than the current one, once; goes to
/// a version that exists; the steps reach the current version without a cycle; and no
/// version between the oldest one read and the current one is left without a step.
pub fn check_chain(cx: &mut Ctxt, event: &Event) {
    if event.upcasts.is_empty() {
        return;
    }
    let number = |value: &str| value.parse::<u64>().unwrap_or(0);
    let current = number(&event.version);
    let mut sound = !event.upcast_refused;
    // Each step's `from`, once; the index of the step that reads it.
    let mut steps: Vec<(u64, usize)> = Vec::new();
    // Steps reading another name (a renamed, split or dropped event): each enters the
    // chain once, at its `to`; only a second step for the same (name, version) is refused.
    let mut others: Vec<(&str, &str)> = Vec::new();
    for (index, step) in event.upcasts.iter().enumerate() {
        let from = number(&step.from.value);
        let old_name = event.old_name(step);
        if old_name != event.name {
            if others.contains(&(old_name, step.from.value.as_str())) {
                cx.error_spanned_by(
                    &step.from.lit,
                    format!(
                        "duplicate upcast step for `{old_name}` version \"{}\": an earlier \
                         step already reads it; give one step per stored (name, version)",
                        step.from.value
                    ),
                );
                sound = false;
            }
            others.push((old_name, step.from.value.as_str()));
            continue;
        }
        if from >= current {
            cx.error_spanned_by(
                &step.from.lit,
                format!(
                    "an upcast step reads an older version, but \"{}\" is not older than the \
                     current version \"{}\" of `{}`; to read an event stored under another \
                     name, give that name: `upcast(name = \"OldName\", ..)`",
                    step.from.value, event.version, event.name
                ),
            );
            sound = false;
        } else if steps.iter().any(|(seen, _)| *seen == from) {
            cx.error_spanned_by(
                &step.from.lit,
                format!(
                    "duplicate upcast step from version \"{}\" of `{}`: an earlier \
                     `upcast(from = \"{}\", ..)` already reads it; give one step per version",
                    step.from.value, event.name, step.from.value
                ),
            );
            sound = false;
        } else {
            steps.push((from, index));
        }
    }
    let exists =
        |version: u64| version == current || steps.iter().any(|(from, _)| *from == version);
    let known = || {
        let mut olds: Vec<u64> = steps.iter().map(|(from, _)| *from).collect();
        olds.sort_unstable();
        let olds: Vec<String> = olds.iter().map(|from| format!("\"{from}\"")).collect();
        if olds.is_empty() {
            format!(
                "`{}` has only its current version \"{}\"",
                event.name, event.version
            )
        } else {
            format!(
                "`{}` has the current version \"{}\" and steps from {}",
                event.name,
                event.version,
                olds.join(", ")
            )
        }
    };
    for step in &event.upcasts {
        if let Some(to) = &step.to {
            if !exists(number(&to.value)) {
                cx.error_spanned_by(
                    &to.lit,
                    format!(
                        "this step goes to version \"{}\", which does not exist: {}",
                        to.value,
                        known()
                    ),
                );
                sound = false;
            }
        }
    }
    if !sound {
        return;
    }
    // Cycles: follow each step's `to` until the current version; report each cycle once,
    // at the `to` of the step that closes it.
    let target = |index: usize| {
        event.upcasts[index]
            .to
            .as_ref()
            .map_or(current, |to| number(&to.value))
    };
    let mut reported: Vec<Vec<u64>> = Vec::new();
    for (start, start_index) in &steps {
        let mut path = vec![*start];
        let mut index = *start_index;
        loop {
            let next = target(index);
            if next == current {
                break;
            }
            if let Some(position) = path.iter().position(|seen| *seen == next) {
                let mut cycle = path[position..].to_vec();
                let mut key = cycle.clone();
                key.sort_unstable();
                if !reported.contains(&key) {
                    reported.push(key);
                    cycle.push(next);
                    let shown: Vec<String> = cycle.iter().map(|v| format!("\"{v}\"")).collect();
                    let step = &event.upcasts[index];
                    let tokens = step
                        .to
                        .as_ref()
                        .map_or_else(|| step.from.lit.clone(), |to| to.lit.clone());
                    cx.error_spanned_by(
                        &tokens,
                        format!(
                            "upcast steps of `{}` form a cycle: {}; every chain must end at \
                             the current version \"{}\"",
                            event.name,
                            shown.join(" -> "),
                            event.version
                        ),
                    );
                }
                break;
            }
            path.push(next);
            match steps.iter().find(|(from, _)| *from == next) {
                Some((_, next_index)) => index = *next_index,
                None => break,
            }
        }
    }
    // Gaps: every version from the oldest one read up to the current one has a step.
    let oldest = steps.iter().map(|(from, _)| *from).min().unwrap_or(current);
    let mut version = oldest;
    while version < current {
        if exists(version) {
            version += 1;
            continue;
        }
        let gap_start = version;
        while !exists(version) {
            version += 1;
        }
        let below = steps
            .iter()
            .filter(|(from, _)| *from < gap_start)
            .max_by_key(|(from, _)| *from)
            .map_or(oldest, |(from, _)| *from);
        let missing = if version - gap_start == 1 {
            format!("version \"{gap_start}\"")
        } else {
            format!("versions \"{gap_start}\" to \"{}\"", version - 1)
        };
        let step = steps
            .iter()
            .find(|(from, _)| *from == below)
            .map(|(_, index)| &event.upcasts[*index]);
        if let Some(step) = step {
            cx.error_spanned_by(
                &step.from.lit,
                format!(
                    "the upcast chain of `{}` has a gap: no step reads {missing}, between this \
                     step's version \"{below}\" and version \"{version}\", so stored events of \
                     that version would not decode; add `upcast(from = \"{gap_start}\", ..)`",
                    event.name
                ),
            );
        }
    }
}
