import ArgumentParser
import Foundation
import NBSNetlink

struct Monitor: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print interface and address events as the library sees them (netlink), one per line.")

    @Flag(name: .long, help: "One JSON object per line.") var json = false
    @Option(name: .long, help: "Stop after this many seconds (default: run until interrupted).") var duration: Double?

    func run() async throws {
        let monitor: NetlinkInterfaceMonitor
        do {
            monitor = try NetlinkInterfaceMonitor()
            try monitor.start()
        } catch {
            throw CLIError("cannot open the netlink monitor: \(error)", hint: "netlink (NETLINK_ROUTE) must be available in this network namespace")
        }
        defer { monitor.stop() }
        let start = ContinuousClock.now
        let events = monitor.events
        let printer = Task {
            for await event in events {
                print(line(for: event, at: (ContinuousClock.now - start).seconds))
                fflush(nil)
            }
        }
        if let duration {
            try await Task.sleep(for: .milliseconds(Int(duration * 1000)))
            printer.cancel()
        } else {
            await printer.value
        }
    }

    private func line(for event: InterfaceEvent, at t: Double) -> String {
        guard json else { return String(format: "%8.3f  ", t) + event.description }
        var object: [String: Any] = ["t": round3(t)]
        switch event {
        case .interfaceUp(let i), .interfaceDown(let i), .interfaceRemoved(let i):
            object["event"] = { if case .interfaceUp = event { "interface_up" } else if case .interfaceDown = event { "interface_down" } else { "interface_removed" } }()
            object["interface"] = i.name
            object["index"] = Int(i.index)
        case .addressAdded(let a), .addressRemoved(let a):
            object["event"] = { if case .addressAdded = event { "address_added" } else { "address_removed" } }()
            object["address"] = a.address
            object["prefix_length"] = Int(a.prefixLength)
            object["interface"] = a.interfaceName
            object["family"] = a.family == .inet ? "ipv4" : "ipv6"
            object["scope"] = Int(a.scope)
            object["tentative"] = a.isTentative
            object["deprecated"] = a.isDeprecated
            object["usable"] = a.isUsableForSubflows
        }
        let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }
}
