import NIOCore

/// The name a legacy peer gets: it sends no name, so its address stands in for one, in the form
/// DNS uses for reverse lookups (RFC 1035 §3.5, RFC 3596 §2.5), as the original prototype did.
public enum ReverseName {
    /// `d.c.b.a.in-addr.arpa` for IPv4, the 32 nibbles reversed under `ip6.arpa` for IPv6. An
    /// IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4 peer) is named as IPv4.
    public static func of(_ address: SocketAddress) -> String? {
        switch address {
        case .v4(let a):
            return of(ipv4: withUnsafeBytes(of: a.address.sin_addr) { Array($0) })
        case .v6(let a):
            return of(ipv6: withUnsafeBytes(of: a.address.sin6_addr) { Array($0) })
        default:
            return nil
        }
    }

    /// `bytes`: 4 (IPv4) or 16 (IPv6) bytes in network order.
    public static func of(packed bytes: [UInt8]) -> String? {
        switch bytes.count {
        case 4: of(ipv4: bytes)
        case 16: of(ipv6: bytes)
        default: nil
        }
    }

    private static func of(ipv4 bytes: [UInt8]) -> String {
        bytes.reversed().map(String.init).joined(separator: ".") + ".in-addr.arpa"
    }

    private static func of(ipv6 bytes: [UInt8]) -> String {
        if bytes.prefix(10).allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF {
            return of(ipv4: Array(bytes.suffix(4)))
        }
        let digits = Array("0123456789abcdef")
        var labels: [String] = []
        for byte in bytes.reversed() {
            labels.append(String(digits[Int(byte & 0x0F)]))
            labels.append(String(digits[Int(byte >> 4)]))
        }
        return labels.joined(separator: ".") + ".ip6.arpa"
    }
}
