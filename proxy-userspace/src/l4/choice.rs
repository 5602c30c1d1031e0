//! Upstream choice for the userspace paths: the same Maglev table and flow hash the XDP program
//! uses (`maglev::build_table`, `maglev::flow_slot` on `proxy_common::hash`), fed from the same
//! places the fast path is fed from: the plan at start, then the control plane's shared status
//! (health, weight, drain, resolved addresses) whenever it lists the service. Nothing here decides
//! health: it only reads it.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use crate::{
    config::Protocol,
    maglev::{self, Backend},
    plan::PlannedService,
    state::ServiceStatus,
};

/// One service's current choice: its Maglev table and the upstreams its ids name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// `MAGLEV_SIZE` upstream ids (0 = no upstream), exactly as the fast path holds it.
    table: Vec<u32>,
    /// id -> address of every upstream in the table.
    upstreams: Vec<(u32, SocketAddr)>,
}

impl Choice {
    /// No upstream.
    #[must_use]
    pub const fn empty() -> Self {
        Self {
            table: Vec::new(),
            upstreams: Vec::new(),
        }
    }

    /// From the plan the fast path would be written with (`plan::build`).
    #[must_use]
    pub fn from_plan(service: &PlannedService, upstreams: &[(u32, SocketAddr)]) -> Self {
        let ids: HashSet<u32> = service
            .table
            .iter()
            .copied()
            .filter(|id| *id != 0)
            .collect();
        Self {
            table: service.table.clone(),
            upstreams: upstreams
                .iter()
                .copied()
                .filter(|(id, _)| ids.contains(id))
                .collect(),
        }
    }

    /// From the control plane's status of the service: the upstreams it keeps in the table
    /// (`in_table`: healthy, weight > 0, not draining) with their resolved addresses and
    /// weights. `None` when the status lists no upstream at all (not filled in yet).
    #[must_use]
    pub fn from_status(service: &ServiceStatus) -> Option<Self> {
        Some(Self::from_inputs(&Self::inputs(service)?))
    }

    /// What [`Choice::from_status`] builds from: `(id, weight, address)` of every upstream in
    /// the table, in status order. `None` when the status lists no upstream at all.
    fn inputs(service: &ServiceStatus) -> Option<Vec<(u32, u32, SocketAddr)>> {
        if service.upstreams.is_empty() {
            return None;
        }
        let mut inputs: Vec<(u32, u32, SocketAddr)> = Vec::new();
        for (i, u) in service.upstreams.iter().enumerate() {
            let Some(addr) = u.resolved else { continue };
            if !u.in_table || u.weight == 0 {
                continue;
            }
            // The id only labels the slots; the layout depends on identity and weight alone.
            let id =
                u.id.unwrap_or_else(|| u32::try_from(i + 1).unwrap_or(u32::MAX));
            if inputs.iter().any(|(_, _, a)| *a == addr) {
                continue;
            }
            inputs.push((id, u.weight, addr));
        }
        Some(inputs)
    }

    fn from_inputs(inputs: &[(u32, u32, SocketAddr)]) -> Self {
        let backends: Vec<Backend> = inputs
            .iter()
            .map(|(id, weight, addr)| Backend {
                id: *id,
                weight: *weight,
                identity: addr.to_string(),
            })
            .collect();
        Self {
            table: maglev::build_table(&backends),
            upstreams: inputs.iter().map(|(id, _, addr)| (*id, *addr)).collect(),
        }
    }

    /// Whether any upstream can take a new flow.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The upstreams to try for a new flow, best first: the one the fast path would pick for
    /// this 5-tuple, then the others (for a retry after a failed connect). Empty: none.
    #[must_use]
    pub fn candidates(
        &self,
        client: SocketAddr,
        service: SocketAddr,
        protocol: Protocol,
    ) -> Vec<SocketAddr> {
        let id = maglev::upstream_for_flow(
            &self.table,
            client.ip(),
            client.port(),
            service.ip(),
            service.port(),
            protocol.number(),
        );
        let mut out = Vec::with_capacity(self.upstreams.len());
        if let Some((_, a)) = self.upstreams.iter().find(|(i, _)| *i == id) {
            out.push(*a);
        }
        out.extend(
            self.upstreams
                .iter()
                .filter(|(i, _)| *i != id)
                .map(|(_, a)| *a),
        );
        out
    }

    /// The upstream addresses in the table.
    #[must_use]
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams.iter().map(|(_, a)| *a).collect()
    }
}

/// A service's choice, replaced as a whole when the status changes (readers clone the `Arc`).
#[derive(Debug)]
pub struct Chooser {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    current: RwLock<Arc<Choice>>,
    /// The status inputs the current choice was last built from: the same inputs build the
    /// same table, so a refresh that finds them unchanged skips the Maglev build.
    built_from: std::sync::Mutex<Option<Vec<(u32, u32, SocketAddr)>>>,
}

impl Chooser {
    #[must_use]
    pub fn new(name: String, listen: SocketAddr, protocol: Protocol, initial: Choice) -> Self {
        Self {
            name,
            listen,
            protocol,
            current: RwLock::new(Arc::new(initial)),
            built_from: std::sync::Mutex::new(None),
        }
    }

    /// The current choice.
    #[must_use]
    pub fn current(&self) -> Arc<Choice> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Adopt what the status says about this service, if it lists it; returns the new choice
    /// when it changed.
    pub fn refresh(&self, services: &[ServiceStatus]) -> Option<Arc<Choice>> {
        let status = services.iter().find(|s| {
            s.name == self.name && s.listen == self.listen && s.protocol == self.protocol.name()
        })?;
        let inputs = Choice::inputs(status)?;
        let mut built_from = match self.built_from.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        if built_from.as_ref() == Some(&inputs) {
            return None;
        }
        let next = Choice::from_inputs(&inputs);
        *built_from = Some(inputs);
        if *self.current() == next {
            return None;
        }
        let next = Arc::new(next);
        match self.current.write() {
            Ok(mut c) => *c = Arc::clone(&next),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&next),
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::*;
    use crate::{
        config::Config,
        plan,
        state::{ServiceStatus, UpstreamStatus},
    };

    const CONFIG: &str = r#"
[datapath]
interfaces = ["eth0"]
[nat]
snat_ipv4 = "10.20.0.1"
home_cidrs = ["10.20.0.0/16"]
[[service]]
name = "web"
listen = "10.10.1.1:80"
upstreams = ["10.20.1.2:80", "10.20.1.3:80", "10.20.1.4:80"]
"#;

    fn planned() -> (plan::Plan, Config) {
        let c = Config::parse(CONFIG, Path::new("t.toml")).unwrap();
        let p = plan::build(&c, Ipv4Addr::new(10, 20, 0, 1), &[], &[]).unwrap();
        (p, c)
    }

    fn up(addr: &str, id: u32, in_table: bool) -> UpstreamStatus {
        UpstreamStatus {
            address: addr.to_owned(),
            resolved: Some(addr.parse().unwrap()),
            id: Some(id),
            weight: 1,
            drain: false,
            healthy: in_table,
            in_table,
            last_error: None,
        }
    }

    fn status(ups: Vec<UpstreamStatus>) -> ServiceStatus {
        ServiceStatus {
            name: "web".into(),
            listen: "10.10.1.1:80".parse().unwrap(),
            protocol: "tcp".into(),
            mode: "l4".into(),
            id: Some(1),
            has_upstreams: true,
            upstreams: ups,
        }
    }

    #[test]
    fn picks_what_the_fast_path_picks() {
        let (p, _) = planned();
        let svc = &p.services[0];
        let choice = Choice::from_plan(svc, &p.upstreams);
        let listen: SocketAddr = "10.10.1.1:80".parse().unwrap();
        let mut seen = HashSet::new();
        for port in 40_000..40_300 {
            let client = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 7), port));
            let want_id = maglev::upstream_for_flow(
                &svc.table,
                client.ip(),
                port,
                listen.ip(),
                80,
                proxy_common::IPPROTO_TCP,
            );
            let want = p.upstreams.iter().find(|(i, _)| *i == want_id).unwrap().1;
            let c = choice.candidates(client, listen, Protocol::Tcp);
            assert_eq!(c[0], want);
            assert_eq!(c.len(), 3);
            seen.insert(c[0]);
        }
        assert_eq!(seen.len(), 3, "flows spread over every upstream");
    }

    #[test]
    fn status_with_the_same_set_gives_the_same_table() {
        let (p, _) = planned();
        let from_plan = Choice::from_plan(&p.services[0], &p.upstreams);
        let ups = p
            .upstreams
            .iter()
            .map(|(id, a)| up(&a.to_string(), *id, true))
            .collect();
        assert_eq!(Choice::from_status(&status(ups)).unwrap(), from_plan);
    }

    #[test]
    fn unhealthy_upstreams_leave_and_none_left_means_empty() {
        let (p, _) = planned();
        let chooser = Chooser::new(
            "web".into(),
            "10.10.1.1:80".parse().unwrap(),
            Protocol::Tcp,
            Choice::from_plan(&p.services[0], &p.upstreams),
        );
        // Status not filled in yet: the plan stays.
        assert!(chooser.refresh(&[]).is_none());
        let mut ups: Vec<UpstreamStatus> = p
            .upstreams
            .iter()
            .map(|(id, a)| up(&a.to_string(), *id, true))
            .collect();
        ups[1].in_table = false;
        let down = ups[1].resolved.unwrap();
        let next = chooser.refresh(&[status(ups.clone())]).unwrap();
        assert_eq!(next.upstreams().len(), 2);
        let client = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 7), 1234));
        for port in 1..500 {
            let c = next.candidates(
                SocketAddr::new(client.ip(), port),
                chooser.listen,
                Protocol::Tcp,
            );
            assert!(!c.contains(&down));
        }
        // Same status again: no change reported.
        assert!(chooser.refresh(&[status(ups.clone())]).is_none());
        for u in &mut ups {
            u.in_table = false;
        }
        let none = chooser.refresh(&[status(ups)]).unwrap();
        assert!(none.is_empty());
        assert!(
            none.candidates(client, chooser.listen, Protocol::Tcp)
                .is_empty()
        );
    }
}
