//! An EndpointSlice as translation reads it, and nothing more: every slice of the cluster is
//! kept between syncs, so each one kept whole (labels, annotations, each endpoint's zone,
//! hostname, Pod reference and deprecated topology, read into k8s-openapi's types that hold a
//! slot for every field) would cost the agent memory for fields it never reads. Fields absent
//! here are skipped while the API server's JSON (or a manifest's YAML) is read, never stored.
//!
//! The two pieces of metadata translation and the metrics read are taken out of their maps as
//! the object is read: the `kubernetes.io/service-name` label (the Service it belongs to) and the
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation (network programming latency).

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints};
use serde::{Deserialize, Deserializer};

use crate::{model::LABEL_SERVICE_NAME, observe::TRIGGER_TIME};

/// An EndpointSlice (discovery.k8s.io/v1): name, namespace and version; the Service it belongs
/// to; the address type, ports and endpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointSlice {
    /// Name, namespace and resourceVersion only (what a store and a watch need).
    pub metadata: super::Meta,
    /// The `kubernetes.io/service-name` label.
    pub service_name: Option<Box<str>>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub trigger_time: Option<std::sync::Arc<str>>,
    pub address_type: super::Word,
    /// (Boxed slices, not `Vec`s: a list read from JSON grows by doubling, and its spare room
    /// would be kept with the slice.)
    pub endpoints: Option<Box<[Endpoint]>>,
    pub ports: Option<Box<[EndpointPort]>>,
}

/// A port of the slice: its name, number and protocol (not its appProtocol).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct EndpointPort {
    pub name: Option<Box<str>>,
    pub port: Option<i32>,
    pub protocol: Option<super::Word>,
}

/// One endpoint: its address, conditions, node and topology hints (boxed: nearly always absent).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The first of its `addresses`, the endpoint's own (the others are fungible, and kube-proxy
    /// reads only the first); `None` when there is none.
    #[serde(default, rename = "addresses", deserialize_with = "first_address")]
    pub address: Option<Address>,
    pub conditions: Option<EndpointConditions>,
    /// One string for every endpoint on the node ([`super::shared_name`]).
    #[serde(default, deserialize_with = "super::shared_name_of")]
    pub node_name: Option<std::sync::Arc<str>>,
    pub hints: Option<Box<EndpointHints>>,
}

/// An endpoint's address as read: an IPv4 address in its usual dotted form (nearly every
/// address) is held as its four bytes, not as a string allocated for it (at 100,000 Services of
/// 3 endpoints, 7 MB less); anything else (IPv6, leading zeros, not an address at all) as its
/// text, for translation to judge and name as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    V4(Ipv4Addr),
    Text(Box<str>),
}

impl Address {
    pub fn new(s: &str) -> Address {
        // Rust's parser takes exactly four decimal octets without leading zeros, the form
        // `Display` prints: the text is what it was.
        match s.parse::<Ipv4Addr>() {
            Ok(a) => Address::V4(a),
            Err(_) => Address::Text(s.into()),
        }
    }

    /// As translation reads an address ([`crate::addr::parse_ip`]).
    pub fn family(&self) -> Result<crate::addr::Family<Ipv4Addr>, String> {
        match self {
            Address::V4(a) => Ok(crate::addr::Family::V4(*a)),
            Address::Text(s) => crate::addr::parse_ip(s),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::V4(a) => a.fmt(f),
            Address::Text(s) => f.write_str(s),
        }
    }
}

impl From<&str> for Address {
    fn from(s: &str) -> Address {
        Address::new(s)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Address;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address (a string)")
            }
            fn visit_str<E>(self, s: &str) -> Result<Address, E> {
                Ok(Address::new(s))
            }
        }
        d.deserialize_str(Text)
    }
}

/// The first address of a list (`null` or empty: none); the rest are skipped unread.
fn first_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Address>, D::Error> {
    struct First;
    impl<'de> serde::de::Visitor<'de> for First {
        type Value = Option<Address>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of addresses")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(First)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let first = seq.next_element::<Address>()?;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(first)
        }
    }
    d.deserialize_option(First)
}

impl<'de> Deserialize<'de> for EndpointSlice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            #[serde(default, deserialize_with = "super::WireMeta::read")]
            metadata: super::WireMeta<BTreeMap<String, String>>,
            // Absent or `null`: empty, as k8s-openapi reads it (translation then names it).
            #[serde(default, deserialize_with = "super::null_default")]
            address_type: super::Word,
            endpoints: Option<Box<[Endpoint]>>,
            ports: Option<Box<[EndpointPort]>>,
        }
        let w = Wire::deserialize(d)?;
        let (metadata, labels, annotations) = w.metadata.split();
        Ok(EndpointSlice {
            metadata,
            service_name: labels.and_then(|mut l| l.remove(LABEL_SERVICE_NAME)).map(Into::into),
            trigger_time: annotations.and_then(|mut a| a.remove(TRIGGER_TIME)).map(Into::into),
            address_type: w.address_type,
            endpoints: w.endpoints,
            ports: w.ports,
        })
    }
}

namespaced_resource!(EndpointSlice, api_version: "discovery.k8s.io/v1", group: "discovery.k8s.io", version: "v1", kind: "EndpointSlice", plural: "endpointslices");

impl super::kept::Kept for EndpointSlice {
    fn meta(&self) -> &super::Meta {
        &self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An EndpointSlice as kube-apiserver v1.37.2's EndpointSlice controller writes it, with
    /// managedFields, owner references, a Pod reference, zone, hostname and hints.
    const SERVED: &str = r#"{
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": "web-8xk2p", "generateName": "web-", "namespace": "shop",
            "uid": "5d0f0a4e-3c43-4b7e-9d68-0c2f6f0e9a11", "resourceVersion": "4121", "generation": 3,
            "creationTimestamp": "2026-12-03T10:00:00Z",
            "labels": {"app": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io", "kubernetes.io/service-name": "web"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-03T10:00:01Z", "ferry.test/note": "unread"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u1", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "discovery.k8s.io/v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:addressType": {}}}]
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": ["10.244.1.17"], "conditions": {"ready": true, "serving": true, "terminating": false},
            "hostname": "web-1", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "u2"},
            "nodeName": "node-1", "zone": "zone-a", "hints": {"forZones": [{"name": "zone-a"}]},
            "deprecatedTopology": {"kubernetes.io/hostname": "node-1"}
        }],
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]
    }"#;

    #[test]
    fn a_served_slice_keeps_only_what_translation_reads() {
        let s: EndpointSlice = serde_json::from_str(SERVED).unwrap();
        let full: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_str(SERVED).unwrap();
        let (e, f) = (&s.endpoints.as_ref().unwrap()[0], &full.endpoints.as_ref().unwrap()[0]);
        assert_eq!((e.address.as_ref().map(|a| a.to_string()), &e.conditions, e.node_name.as_deref(), e.hints.as_deref()), (f.addresses.first().cloned(), &f.conditions, f.node_name.as_deref(), f.hints.as_ref()));
        assert_eq!(e.address, Some(Address::V4(Ipv4Addr::new(10, 244, 1, 17))));
        assert_eq!(&*s.address_type, full.address_type);
        let (p, fp) = (&s.ports.as_ref().unwrap()[0], &full.ports.as_ref().unwrap()[0]);
        assert_eq!((p.name.as_deref(), p.port, p.protocol.as_deref()), (fp.name.as_deref(), fp.port, fp.protocol.as_deref()));
        assert!(matches!((&s.address_type, &p.protocol), (super::super::Word::Known("IPv4"), Some(super::super::Word::Known("TCP")))));
        // Endpoints on one node hold one string of its name.
        let two: EndpointSlice = serde_json::from_str(&SERVED.replace(r#""endpoints": [{"#, r#""endpoints": [{"addresses": ["10.244.1.18"], "nodeName": "node-1"}, {"#)).unwrap();
        let eps = two.endpoints.as_deref().unwrap();
        assert!(std::sync::Arc::ptr_eq(eps[0].node_name.as_ref().unwrap(), eps[1].node_name.as_ref().unwrap()));
        assert_eq!(eps[1].node_name.as_deref(), Some("node-1"));
        assert_eq!((s.service_name.as_deref(), s.trigger_time.as_deref()), (Some("web"), Some("2026-12-03T10:00:01Z")));
        assert_eq!(
            s.metadata,
            super::super::Meta { name: Some("web-8xk2p".into()), namespace: Some("shop".into()), resource_version: Some("4121".into()) }
        );
        let debug = format!("{s:?}");
        for gone in ["FieldsV1", "ferry.test/note", "managed-by", "web-1", "zone: Some", "u2", "generateName", "hostname"] {
            assert!(!debug.contains(gone), "{gone} kept: {debug}");
        }
    }

    #[test]
    fn an_address_is_held_as_four_bytes_only_where_its_text_is_the_usual_form() {
        use crate::addr::Family;
        for text in ["0.0.0.0", "10.244.1.17", "255.255.255.255", "1.2.3.4"] {
            let a = Address::new(text);
            assert!(matches!(a, Address::V4(_)), "{text}");
            assert_eq!(a.to_string(), text);
        }
        for (text, family) in [("010.244.1.17", Ok(Family::V4(Ipv4Addr::new(10, 244, 1, 17)))), ("fe80::1", Ok(Family::V6)), ("10.244.1", Err(())), ("web", Err(())), ("", Err(()))] {
            let a = Address::new(text);
            assert_eq!(a, Address::Text(text.into()));
            assert_eq!(a.to_string(), text);
            assert_eq!(a.family().map_err(|_| ()), family, "{text}");
        }
        let s: EndpointSlice = serde_json::from_str(&SERVED.replace(r#""addresses": ["10.244.1.17"]"#, r#""addresses": ["010.244.1.17"]"#)).unwrap();
        assert_eq!(s.endpoints.unwrap()[0].address, Some(Address::Text("010.244.1.17".into())));
    }

    #[test]
    fn a_mistyped_read_field_is_named_and_a_missing_one_is_empty() {
        let e = serde_path_to_error::deserialize::<_, EndpointSlice>(&mut serde_json::Deserializer::from_str(&SERVED.replace(r#""port": 8080"#, r#""port": "http""#))).unwrap_err();
        assert_eq!(e.path().to_string(), "ports[0].port");
        let e = serde_path_to_error::deserialize::<_, EndpointSlice>(&mut serde_json::Deserializer::from_str(&SERVED.replace(r#""addresses": ["10.244.1.17"]"#, r#""addresses": [17]"#))).unwrap_err();
        assert_eq!(e.path().to_string(), "endpoints[0].addresses[0]");
        // The first address is kept, the others (fungible, unread by kube-proxy) are not.
        let s: EndpointSlice = serde_json::from_str(&SERVED.replace(r#""addresses": ["10.244.1.17"]"#, r#""addresses": ["10.244.1.17", "10.244.1.18"]"#)).unwrap();
        assert_eq!(s.endpoints.unwrap()[0].address, Some(Address::V4(Ipv4Addr::new(10, 244, 1, 17))));
        // Missing ones read as k8s-openapi reads them: empty (translation names them then).
        let s: EndpointSlice = serde_json::from_str(&SERVED.replace(r#""addressType": "IPv4","#, "").replace(r#""addresses": ["10.244.1.17"], "#, "")).unwrap();
        assert_eq!((&*s.address_type, s.endpoints.unwrap()[0].address.is_none()), ("", true));
        let s: EndpointSlice = serde_json::from_str(&SERVED.replace(r#""addressType": "IPv4""#, r#""addressType": null"#).replace(r#""addresses": ["10.244.1.17"]"#, r#""addresses": null"#)).unwrap();
        assert_eq!((&*s.address_type, s.endpoints.unwrap()[0].address.is_none()), ("", true));
    }
}
