//! GeoIP look-ups for the geography anomaly rules (`[anomaly.geo]`).
//!
//! The City database (GeoIP2 or GeoLite2, MaxMind DB format) and the
//! optional ASN database are read into memory at start and again on a
//! reload (SIGHUP, after `geoipupdate`); a look-up is a walk of the
//! in-memory search tree, no I/O.

use std::net::IpAddr;
use std::path::Path;

use maxminddb::{geoip2, Reader};

use crate::config::anomaly::GeoConfig;

/// Where an address is, as far as the databases know.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Place {
    /// ISO 3166-1 alpha-2 country code (`DE`).
    pub country: Option<String>,
    /// The city's English name.
    pub city: Option<String>,
    /// Latitude and longitude in degrees.
    pub coords: Option<(f64, f64)>,
    /// Autonomous system number (with an ASN database).
    pub asn: Option<u32>,
    /// The organisation that operates the autonomous system.
    pub as_org: Option<String>,
}

/// The opened databases.
pub struct GeoDb {
    city: Reader<Vec<u8>>,
    asn: Option<Reader<Vec<u8>>>,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb")
            .field("city", &self.city.metadata().database_type)
            .field("asn", &self.asn.as_ref().map(|a| a.metadata().database_type.clone()))
            .finish()
    }
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("[anomaly.geo] {key}: cannot read {}: {e}", path.display()))
}

impl GeoDb {
    /// Opens the databases `[anomaly.geo]` names; `None` when the rules are
    /// off (no `city_database`, or both rules disabled).
    pub fn open(cfg: &GeoConfig) -> Result<Option<GeoDb>, String> {
        let Some(city) = cfg.city_database.as_deref().filter(|_| cfg.active()) else { return Ok(None) };
        let asn = match cfg.asn_database.as_deref() {
            Some(p) => Some(read("asn_database", p)?),
            None => None,
        };
        GeoDb::from_bytes(read("city_database", city)?, asn).map(Some)
    }

    /// The databases from their bytes; refuses a file that is not a City
    /// (or ASN) database in the MaxMind DB format.
    pub fn from_bytes(city: Vec<u8>, asn: Option<Vec<u8>>) -> Result<GeoDb, String> {
        let city = Reader::from_source(city)
            .map_err(|e| format!("[anomaly.geo] city_database: not a MaxMind DB file: {e}"))?;
        let kind = &city.metadata().database_type;
        if !(kind.contains("City") || kind.contains("Enterprise")) {
            return Err(format!("[anomaly.geo] city_database: a {kind} database, not a City database"));
        }
        let asn = match asn {
            Some(bytes) => {
                let r = Reader::from_source(bytes)
                    .map_err(|e| format!("[anomaly.geo] asn_database: not a MaxMind DB file: {e}"))?;
                let kind = &r.metadata().database_type;
                if !(kind.contains("ASN") || kind.contains("ISP")) {
                    return Err(format!("[anomaly.geo] asn_database: a {kind} database, not an ASN database"));
                }
                Some(r)
            }
            None => None,
        };
        Ok(GeoDb { city, asn })
    }

    /// The place of `ip`; `None` when the City database has neither a
    /// country nor coordinates for it (private and loopback addresses).
    pub fn lookup(&self, ip: IpAddr) -> Option<Place> {
        let ip = ip.to_canonical();
        let found = self.city.lookup(ip).ok()?;
        let city: geoip2::City<'_> = found.decode().ok()??;
        let coords = match (city.location.latitude, city.location.longitude) {
            (Some(lat), Some(lon)) if lat.is_finite() && lon.is_finite() => Some((lat, lon)),
            _ => None,
        };
        let country = city.country.iso_code.filter(|c| !c.is_empty()).map(str::to_owned);
        if country.is_none() && coords.is_none() {
            return None;
        }
        let mut place = Place { country, city: city.city.names.english.map(str::to_owned), coords, ..Place::default() };
        if let Some(asn) = &self.asn {
            if let Some(a) = asn.lookup(ip).ok().and_then(|r| r.decode::<geoip2::Asn<'_>>().ok().flatten()) {
                place.asn = a.autonomous_system_number;
                place.as_org = a.autonomous_system_organization.map(str::to_owned);
            }
        }
        Some(place)
    }
}

/// The great-circle distance between two points (degrees), in kilometres.
pub fn haversine_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0088;
    let (lat1, lat2) = (a.0.to_radians(), b.0.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.1 - a.1).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// A minimal MaxMind DB writer for tests: they build their own City and
/// ASN databases (no download, no fixture files).
#[cfg(test)]
pub(crate) mod testdb {
    use ipnet::IpNet;

    /// A value of the MaxMind DB data section.
    pub enum V {
        Str(&'static str),
        F64(f64),
        U16(u16),
        U32(u32),
        U64(u64),
        Map(Vec<(&'static str, V)>),
        Arr(Vec<V>),
    }

    fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
        let (bits, extra): (u8, Vec<u8>) = if size < 29 {
            (size as u8, vec![])
        } else if size < 285 {
            (29, vec![(size - 29) as u8])
        } else if size < 65_821 {
            (30, ((size - 285) as u16).to_be_bytes().to_vec())
        } else {
            (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec())
        };
        // Types above 7 are "extended": type 0 in the control byte, the
        // type minus 7 in the next byte.
        out.push(if kind <= 7 { kind << 5 } else { 0 } | bits);
        if kind > 7 {
            out.push(kind - 7);
        }
        out.extend(extra);
    }

    fn uint(out: &mut Vec<u8>, kind: u8, v: u64) {
        let bytes = v.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        control(out, kind, 8 - skip);
        out.extend(&bytes[skip..]);
    }

    pub fn encode(v: &V, out: &mut Vec<u8>) {
        match v {
            V::Str(s) => {
                control(out, 2, s.len());
                out.extend(s.as_bytes());
            }
            V::F64(f) => {
                control(out, 3, 8);
                out.extend(f.to_be_bytes());
            }
            V::U16(n) => uint(out, 5, u64::from(*n)),
            V::U32(n) => uint(out, 6, u64::from(*n)),
            V::U64(n) => uint(out, 9, *n),
            V::Map(pairs) => {
                control(out, 7, pairs.len());
                for (k, v) in pairs {
                    encode(&V::Str(k), out);
                    encode(v, out);
                }
            }
            V::Arr(items) => {
                control(out, 11, items.len());
                for v in items {
                    encode(v, out);
                }
            }
        }
    }

    #[derive(Clone, Copy)]
    enum Rec {
        Empty,
        Node(u32),
        Data(u32),
    }

    /// An IPv6 database (IPv4 networks live under `::/96`, as in MaxMind's
    /// own files) with `database_type` `kind`.
    pub fn build(kind: &'static str, entries: &[(&str, V)]) -> Vec<u8> {
        let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty; 2]];
        let mut data = Vec::new();
        for (net, value) in entries {
            let net: IpNet = net.parse().unwrap();
            let (bits, len) = match net {
                IpNet::V4(n) => (u128::from(u32::from(n.network())), u32::from(n.prefix_len()) + 96),
                IpNet::V6(n) => (u128::from(n.network()), u32::from(n.prefix_len())),
            };
            let offset = data.len() as u32;
            encode(value, &mut data);
            let mut node = 0usize;
            for i in 0..len {
                let bit = ((bits >> (127 - i)) & 1) as usize;
                if i + 1 == len {
                    nodes[node][bit] = Rec::Data(offset);
                    break;
                }
                node = match nodes[node][bit] {
                    Rec::Node(n) => n as usize,
                    Rec::Empty => {
                        nodes.push([Rec::Empty; 2]);
                        let n = nodes.len() - 1;
                        nodes[node][bit] = Rec::Node(n as u32);
                        n
                    }
                    Rec::Data(_) => panic!("test database: {net} overlaps a shorter network"),
                };
            }
        }
        let count = nodes.len() as u32;
        let mut out = Vec::new();
        for pair in &nodes {
            for r in pair {
                let v = match *r {
                    Rec::Empty => count,
                    Rec::Node(n) => n,
                    Rec::Data(off) => count + 16 + off,
                };
                out.extend(v.to_be_bytes());
            }
        }
        out.extend([0u8; 16]);
        out.extend(data);
        out.extend(b"\xAB\xCD\xEFMaxMind.com");
        let meta = V::Map(vec![
            ("binary_format_major_version", V::U16(2)),
            ("binary_format_minor_version", V::U16(0)),
            ("build_epoch", V::U64(1_700_000_000)),
            ("database_type", V::Str(kind)),
            ("description", V::Map(vec![("en", V::Str("POP3conneX test database"))])),
            ("ip_version", V::U16(6)),
            ("languages", V::Arr(vec![V::Str("en")])),
            ("node_count", V::U32(count)),
            ("record_size", V::U16(32)),
        ]);
        encode(&meta, &mut out);
        out
    }

    /// A City record.
    pub fn city(country: &'static str, name: &'static str, lat: f64, lon: f64) -> V {
        V::Map(vec![
            ("city", V::Map(vec![("names", V::Map(vec![("en", V::Str(name))]))])),
            ("country", V::Map(vec![("iso_code", V::Str(country))])),
            (
                "location",
                V::Map(vec![("accuracy_radius", V::U16(20)), ("latitude", V::F64(lat)), ("longitude", V::F64(lon))]),
            ),
        ])
    }

    /// An ASN record.
    pub fn asn(number: u32, org: &'static str) -> V {
        V::Map(vec![("autonomous_system_number", V::U32(number)), ("autonomous_system_organization", V::Str(org))])
    }
}

#[cfg(test)]
mod tests {
    use super::testdb::{asn, build, city};
    use super::*;

    #[test]
    fn a_generated_database_answers_lookups_and_unknown_addresses_have_no_place() {
        let db = GeoDb::from_bytes(
            build(
                "GeoLite2-City",
                &[
                    ("81.2.69.0/24", city("GB", "London", 51.5142, -0.0931)),
                    ("2001:db8:1::/48", city("DE", "Berlin", 52.52, 13.405)),
                ],
            ),
            Some(build("GeoLite2-ASN", &[("81.2.69.0/24", asn(20712, "Andrews & Arnold Ltd"))])),
        )
        .unwrap();
        let p = db.lookup("81.2.69.160".parse().unwrap()).unwrap();
        assert_eq!(p.country.as_deref(), Some("GB"));
        assert_eq!(p.city.as_deref(), Some("London"));
        assert_eq!(p.coords, Some((51.5142, -0.0931)));
        assert_eq!((p.asn, p.as_org.as_deref()), (Some(20712), Some("Andrews & Arnold Ltd")));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert_eq!(db.lookup("::ffff:81.2.69.1".parse().unwrap()).unwrap().country.as_deref(), Some("GB"));
        let p = db.lookup("2001:db8:1::7".parse().unwrap()).unwrap();
        assert_eq!((p.country.as_deref(), p.asn), (Some("DE"), None));
        for none in ["127.0.0.1", "10.1.2.3", "192.168.0.1", "::1", "81.2.70.1"] {
            assert_eq!(db.lookup(none.parse().unwrap()), None, "{none}");
        }
        // The wrong kind of database is refused with the key's name.
        let err = GeoDb::from_bytes(build("GeoLite2-ASN", &[]), None).unwrap_err();
        assert!(err.contains("city_database") && err.contains("not a City database"), "{err}");
        let err = GeoDb::from_bytes(b"not a database".to_vec(), None).unwrap_err();
        assert!(err.contains("city_database: not a MaxMind DB file"), "{err}");
    }

    #[test]
    fn haversine_distances() {
        let london = (51.5074, -0.1278);
        let paris = (48.8566, 2.3522);
        let sydney = (-33.8688, 151.2093);
        assert!((haversine_km(london, paris) - 343.5).abs() < 2.0, "{}", haversine_km(london, paris));
        assert!((haversine_km(london, sydney) - 16_990.0).abs() < 30.0, "{}", haversine_km(london, sydney));
        assert_eq!(haversine_km(paris, paris), 0.0);
    }
}
