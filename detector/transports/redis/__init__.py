"""transports/redis"""
