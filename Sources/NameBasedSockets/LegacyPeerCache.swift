import NBSProtocol
import NIOCore
import NIOConcurrencyHelpers

/// Peers (name and port) found not to speak NBS, remembered for `lifetime` so that the next open
/// with `.fallback` goes straight to plain TCP instead of sending NBS bytes to a legacy server
/// again. Bounded: when full, the entry closest to expiry makes room.
public final class LegacyPeerCache: Sendable {
    public static let shared = LegacyPeerCache()

    public let lifetime: TimeAmount
    public let capacity: Int
    private let entries = NIOLockedValueBox<[Key: NIODeadline]>([:])

    struct Key: Hashable {
        var name: String
        var port: Int
    }

    public init(lifetime: TimeAmount = .minutes(10), capacity: Int = 1024) {
        precondition(capacity > 0, "a LegacyPeerCache needs room for at least one peer")
        self.lifetime = lifetime
        self.capacity = capacity
    }

    public func remember(_ name: String, port: Int, now: NIODeadline = .now()) {
        let key = Key(name: canonicalName(name), port: port)
        let expiry = now + lifetime
        let capacity = self.capacity
        entries.withLockedValue { entries in
            if entries[key] == nil, entries.count >= capacity {
                entries = entries.filter { $0.value > now }
                if entries.count >= capacity, let soonest = entries.min(by: { $0.value < $1.value }) {
                    entries.removeValue(forKey: soonest.key)
                }
            }
            entries[key] = expiry
        }
    }

    public func isLegacy(_ name: String, port: Int, now: NIODeadline = .now()) -> Bool {
        let key = Key(name: canonicalName(name), port: port)
        return entries.withLockedValue { entries in
            guard let expiry = entries[key] else { return false }
            if expiry <= now {
                entries.removeValue(forKey: key)
                return false
            }
            return true
        }
    }

    public func forget(_ name: String, port: Int) {
        let key = Key(name: canonicalName(name), port: port)
        _ = entries.withLockedValue { $0.removeValue(forKey: key) }
    }

    public var count: Int { entries.withLockedValue { $0.count } }
}
